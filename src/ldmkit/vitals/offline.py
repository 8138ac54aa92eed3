"""``ldmkit diagnose``: the rule table replayed over any trainer's log, as a table or JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ldmkit.diffusion.parameterization import Parameterization
from ldmkit.vitals.diagnose import Context, Finding, coverage, scenario
from ldmkit.vitals.monitor import SEVERITY_RANK, replay
from ldmkit.vitals.readers import LoadedLog, read_log


@dataclass
class Diagnosis:
    source: str
    scenario: str
    verdict: str
    findings: list[Finding]
    latent_scale_factor: float | None

    def worst(self) -> int:
        """Rank of the most severe finding (-1 when there is none)."""
        return max((SEVERITY_RANK[f.severity] for f in self.findings), default=-1)

    def to_json(self) -> str:
        return json.dumps({"scenario": self.scenario, "verdict": self.verdict,
                           "findings": [f.to_dict() for f in self.findings]}, indent=2)


def diagnose_log(path: str | Path, latent_scale_factor: float | None = None,
                 thresholds: dict[str, float] | None = None,
                 objective: str | None = None) -> Diagnosis:
    """Read ``path`` (JSONL, CSV, TensorBoard) and replay the rules over it under the guide's
    defaults; ``objective`` says what the loss is (flow's starts at 2). An ldmkit run with its
    config: ``ldmkit.diagnosis.diagnose_path``."""
    log = read_log(path, latent_scale_factor)
    return diagnose_loaded(log, with_objective(Context.of(log.latent_scale_factor, thresholds),
                                               objective))


def with_objective(ctx: Context, objective: str | None) -> Context:
    """``ctx`` with the loss units of ``objective`` (the unweighted loss's: the weighting of a
    foreign log is unknown); unchanged for None."""
    if objective is not None:
        ctx.loss_scale = ctx.val_loss_scale = Parameterization(objective).untrained_loss()
    return ctx


def diagnose_loaded(log: LoadedLog, ctx: Context) -> Diagnosis:
    """The rules replayed over a log already read (``read_log``) under ``ctx``."""
    findings = replay(log.series, ctx)
    name = scenario(findings, log.series, ctx)
    return Diagnosis(log.source, name, coverage(name, log.series), findings,
                     log.latent_scale_factor)


def format_table(diagnosis: Diagnosis) -> str:
    """Human-readable findings, most severe first, with the fix under each."""
    scale = ("unknown (pass --latent-scale-factor)" if diagnosis.latent_scale_factor is None
             else f"{diagnosis.latent_scale_factor:.4g}")
    lines = [f"diagnosis of {diagnosis.source}", f"latent_scale_factor: {scale}",
             f"scenario: {diagnosis.verdict}", ""]
    if not diagnosis.findings:
        lines.append("no findings: every vital sign is within the guide's healthy range")
    for f in diagnosis.findings:
        lines.append(f"{f.severity.upper():8} {f.code:24} step {f.step:<8} value {f.value:.4g}"
                     f"  [{f.metric}]")
        lines.append(f"         {f.message}")
        lines.append(f"         fix: {f.fix}")
    return "\n".join(lines)
