"""End-of-run summary: the final vital signs next to the guide's healthy ranges as the rules apply
them to this run, and where things are.

Written to ``run_dir/report.md`` and printed. The full diagnosis (rules over windows, findings,
scenarios) is ``ldmkit.vitals``' job; this is the at-a-glance view.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ldmkit.platform.fastpath import recorded
from ldmkit.platform.files import write_text_atomic
from ldmkit.run.context import run_context
from ldmkit.run.layout import RunDir
from ldmkit.vitals.signs import SIGNS, Band, band_status

if TYPE_CHECKING:
    from ldmkit.training.loop import TrainResult

# the last column: 'ok' inside a good range or where no range judges the value
MARK = {"bad": "bad", "off": "off", "good": "ok", None: "ok"}


def _applied(bands: list[Band]) -> str:
    """The ranges the rules apply, in words: ``good 0.5 to 2; bad < 0.2, > 5``."""
    def side(band: Band) -> str:
        if band.low is not None and band.high is not None:
            return f"{band.low:.3g} to {band.high:.3g}"
        return f"> {band.low:.3g}" if band.low is not None else f"< {band.high:.3g}"

    parts = [f"{kind} " + ", ".join(side(b) for b in bands if b.kind == kind)
             for kind in ("good", "bad") if any(b.kind == kind for b in bands)]
    return "; ".join(parts) or "-"


def summary_text(result: TrainResult) -> str:
    """The final value of each vital sign of ``signs.SIGNS`` next to the guide's words and the
    ranges its rules apply to this run (its loss units and latent scale)."""
    run_dir, scale, vitals = result.run_dir, result.latent_scale_factor, result.vitals
    run = RunDir(run_dir)
    ctx = run_context(run_dir)
    ctx.latent_scale_factor = scale
    lines = [f"# ldmkit run {run_dir.name}", "",
             f"- steps: {result.step}, wall time: {result.seconds / 60:.1f} min",
             f"- latent_scale_factor: {scale:.4f} (healthy final_latent_stats/std ~ "
             f"{1 / scale:.3f})", f"- scenario: **{result.verdict}**"]
    fast = recorded(run.fastpath)
    lines += [f"- computed in: {fast}"] if fast else []
    lines += ["", "| vital sign | final | guide's healthy range | applied to this run | |",
              "|---|---|---|---|---|"]
    for sign in SIGNS:
        if sign.healthy and sign.tag in vitals:
            ranges = sign.bands(ctx)
            lines.append(f"| `{sign.tag}` | {vitals[sign.tag]:.4g} | {sign.healthy} | "
                         f"{_applied(ranges)} | {MARK[band_status(vitals[sign.tag], ranges)]} |")
    lines.append("")
    if result.stopped_by:
        lines.append(f"Stopped early by the critical finding `{result.stopped_by.code}`.")
    for f in result.findings:
        lines.append(f"- **{f.severity}** `{f.code}` (since step {f.step}): {f.message}. "
                     f"Fix: {f.fix}")
    if not result.findings:
        lines.append("No open findings: no rule of the guide fires on this run (a value 'off' "
                     "its good range alone is not a finding).")
    lines += ["", f"- samples: {result.grid if result.grid else '(none yet)'}",
              f"- metrics: {run.metrics} (TensorBoard: {run.tensorboard})",
              f"- findings: {run.findings}",
              f"- checkpoints: {run.checkpoints}",
              f"- report: {run.report_md} and {run.report_html}"]
    return "\n".join(lines) + "\n"


def write_report(result: TrainResult) -> str:
    text = summary_text(result)
    write_text_atomic(RunDir(result.run_dir).report_md, text)
    return text
