"""``ldmkit watch``: a live terminal view of a run's vital signs and open findings.

Follows ``metrics.jsonl`` as it grows (complete lines only, so a line being written is read on
the next refresh) and re-evaluates the guide's rules on each refresh, so what it shows is what
``ldmkit diagnose`` would say at that moment. Works on any directory a ``VitalsMonitor`` writes,
and on any other trainer's log ``ldmkit diagnose`` reads (kohya's or OneTrainer's TensorBoard,
ai-toolkit's ``loss_log.db``, SimpleTuner's ``training_metrics.jsonl``, W&B, MLflow), through
that format's ``sources.LogSource``: what was written since the last refresh is read.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ldmkit.errors import LdmkitError
from ldmkit.report.html import shown_tags
from ldmkit.report.svg import heat_color
from ldmkit.run.context import context_of, run_context
from ldmkit.run.layout import RunDir, is_run
from ldmkit.vitals import metrics as vm
from ldmkit.vitals.diagnose import Context, Series, coverage, evaluate, scenario
from ldmkit.vitals.logs.metrics_jsonl import metrics_reader
from ldmkit.vitals.logs.readers import loaded
from ldmkit.vitals.logs.sources import open_log
from ldmkit.vitals.logs.trainers import LDMKIT, Trainer
from ldmkit.vitals.monitor import TAIL
from ldmkit.vitals.offline import foreign_context, in_trainer_terms
from ldmkit.vitals.signs import band_status, bands

SPARK = "▁▂▃▄▅▆▇█"
STYLE = {"good": "green", "bad": "bold red", "off": "white", None: "white"}


class MetricsFollower:
    """The records appended to a ``metrics.jsonl`` since the last call, as series."""

    def __init__(self, path: Path, ctx: Context | None = None):
        self.path, self.reader = path, metrics_reader(path)
        self.series: Series = {}
        self.ctx = ctx or Context()  # the run's, from its config
        self.trainer, self.config = LDMKIT, {}

    def poll(self) -> int:
        """Add new complete records to ``series``; returns how many were read."""
        if not self.path.exists():  # the run has not logged yet
            return 0
        records = self.reader.poll()
        for step, tag, value in records:
            self.series.setdefault(tag, []).append((step, value))
        return len(records)


def sparkline(values: list[float], width: int = 20) -> str:
    finite = [v for v in values[-width:] if math.isfinite(v)]
    if not finite:
        return ""
    lo, hi = min(finite), max(finite)
    return "".join(SPARK[int((v - lo) / (hi - lo) * (len(SPARK) - 1)) if hi > lo else 0]
                   for v in finite)


def noise_level_rows(series: Series, width: int = 40) -> list[Text]:
    """The validation loss per noise level as coloured cells, noisiest level on top, one
    column per validation (the last ``width``): blue learned, white as untrained, red worse."""
    levels = vm.noise_levels_in(series)
    if not any(series[level.tag] for level in levels):
        return []
    out = [Text("validation loss per noise level (each row over its first value; blue: "
                "learned, white: as untrained, red: worse)", style="bold")]
    width_of_label = max(len(level.label) for level in levels)
    for level in reversed(levels):
        row = series[level.tag]
        finite = [v for _, v in row if math.isfinite(v) and v > 0]
        line = Text(level.label.ljust(width_of_label) + " ")
        for _, v in row[-width:]:
            line.append("█", style=heat_color(v / finite[0]) if finite else "black")
        if row:
            line.append(f" {row[-1][1]:.3g}")
        out.append(line)
    return out


class LogFollower:
    """Another trainer's log, followed through its ``sources.LogSource`` (only what was added
    where the format allows) and judged with its trainer's tags and regime, as ``diagnose``
    judges it."""

    def __init__(self, path: Path):
        self.path, self.series, self.source = path, {}, open_log(path)
        self.ctx, self.trainer, self.config = Context(), LDMKIT, {}

    def poll(self) -> int:
        """Read what the trainer wrote since the last poll; returns 1 when it wrote, else 0."""
        raw = self.source.poll()
        if raw is None:
            return 0
        log = loaded(raw, self.path, require_values=False)
        ctx = context_of(None, log.latent_scale_factor).learn(log.series)
        self.series, self.ctx = log.series, foreign_context(log, ctx)[0]
        self.trainer, self.config = log.trainer, log.config
        return 1


def render(run_dir: Path, series: Series, ctx: Context, trainer: Trainer = LDMKIT,
           config: dict[str, Any] | None = None) -> Group:
    """One frame; ``trainer`` and its saved ``config``: whose log it is, so fixes name that
    trainer's settings as ``diagnose``'s do."""
    logged = [v for _, v in series.get(vm.SCALE_FACTOR, []) if math.isfinite(v)]
    if logged:
        ctx.latent_scale_factor = logged[-1]
    tail = {tag: recs[-TAIL:] for tag, recs in series.items()}
    findings = [in_trainer_terms(f, trainer, config or {}) for f in evaluate(tail, ctx)]
    step = max((s for recs in series.values() for s, _ in recs), default=0)
    table = Table(title=f"{run_dir.name} · step {step} · scenario "
                        f"{coverage(scenario(findings, tail, ctx), tail)}", expand=False)
    for column in ("vital sign", "step", "value", "trend"):
        table.add_column(column)
    for tag in shown_tags(series):
        last_step, value = series[tag][-1]
        style = STYLE[band_status(value, bands(tag, ctx))]
        table.add_row(tag, str(last_step), Text(f"{value:.4g}", style=style),
                      sparkline([v for _, v in series[tag]]))
    lines = [Text(f"{f.severity.upper()} {f.code} (step {f.step}): {f.message}. "
                  f"Fix: {f.fix}",
                  style="bold red" if f.severity == "critical" else "yellow") for f in findings]
    if not series:
        lines = [Text(f"waiting for {RunDir(run_dir).metrics} ...", style="dim")]
    elif not findings:
        lines = [Text("no open findings", style="green")]
    return Group(table, *noise_level_rows(series), *lines)


def frame(run_dir: Path, follower: MetricsFollower | LogFollower) -> Group:
    return render(run_dir, follower.series, follower.ctx, follower.trainer, follower.config)


def watch(run_dir: str | Path, interval: float = 2.0, once: bool = False,
          console: Console | None = None) -> None:
    """Refresh every ``interval`` seconds until Ctrl-C (or print one frame with ``once``)."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise LdmkitError(f"'{run_dir}' does not exist; pass a run directory or another "
                          "trainer's log")
    console = console or Console()
    own = run_dir.is_dir() and (RunDir(run_dir).metrics.exists() or is_run(run_dir)
                                or not any(run_dir.iterdir()))
    follower = MetricsFollower(RunDir(run_dir).metrics, run_context(run_dir)) if own \
        else LogFollower(run_dir)
    follower.poll()
    if once:
        console.print(frame(run_dir, follower))
        return
    with Live(frame(run_dir, follower), console=console, refresh_per_second=4) as live:
        try:
            while True:
                time.sleep(interval)
                if follower.poll():
                    live.update(frame(run_dir, follower))
        except KeyboardInterrupt:
            pass
