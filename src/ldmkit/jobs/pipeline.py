"""Jobs that span packages: ``ldmkit run`` and ``ldmkit train`` train, repair when asked to,
then report.

Kept out of ``cli.py`` so the CLI only maps commands to functions, and a script gets the same
run and report from one call.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ldmkit.config import Config
from ldmkit.jobs.fix import repair
from ldmkit.report import write_html_report, write_report
from ldmkit.training.loop import TrainResult, train


@dataclass
class Outcome:
    result: TrainResult
    summary: str | None  # report.md's text; None where no report was written
    html: Path | None  # report.html


def train_and_report(cfg: Config, run_dir: str | Path | None = None, resume: bool = False,
                     stop_at: int | None = None) -> Outcome:
    """Train (or continue) a run, repair it where ``vitals.on_*: repair`` says (``jobs.fix``),
    then write ``report.md`` and ``report.html`` on rank 0.

    No report is written by other DDP ranks, or by a run stopped before its first stage-2 step
    (the trainer printed how to resume)."""
    result = train(cfg, run_dir, resume=resume, stop_at=stop_at)
    return report(repair(result, cfg))


def report(result: TrainResult) -> Outcome:
    """``result``'s reports, written on rank 0."""
    if result.rank != 0 or (result.preempted_by and result.step == 0):
        return Outcome(result, None, None)
    return Outcome(result, write_report(result), write_html_report(result.run_dir))
