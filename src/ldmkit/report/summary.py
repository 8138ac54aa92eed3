"""End-of-run summary: the final vital signs next to the guide's healthy ranges, and where things are.

Written to ``run_dir/report.md`` and printed. The full diagnosis (rules over windows, findings,
scenarios) is ``ldmkit.vitals``' job; this is the at-a-glance view.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ldmkit.files import write_text_atomic
from ldmkit.vitals import metrics as vm

if TYPE_CHECKING:
    from ldmkit.train import TrainResult

# (tag, guide's healthy range in words), in the guide's order.
_ROWS = (
    (vm.LOSS, "starts ~1.0, decreases to 0.1-0.4"),
    (vm.GRAD_NORM, "stable, 0.1-10"),
    (vm.LEARNING_RATE, "as configured"),
    (vm.UPDATE_RATIO, "well above 1e-8 (weights change)"),
    (vm.T_MEAN, "~0.5 on average"),
    (vm.COS_EPS, "climbs above 0.5"),
    (vm.Z_STD, "~1.0"),
    (vm.PAIRWISE_PREFIX + "mean", "> 0.1"),
    (vm.PAIRWISE_PREFIX + "std", "non-zero"),
    (vm.PAIRWISE_PREFIX + "min", "well above 0"),
    (vm.PAIRWISE_PREFIX + "max", "high"),
    (vm.FINAL_PREFIX + "mean", "~0.0"),
    (vm.FINAL_PREFIX + "std", "~1/latent_scale_factor"),
    (vm.FINAL_PREFIX + "min", ">= -3"),
    (vm.FINAL_PREFIX + "max", "<= 3"),
)


def summary_text(result: TrainResult) -> str:
    run_dir, scale, vitals = result.run_dir, result.latent_scale_factor, result.vitals
    lines = [f"# ldmkit run {run_dir.name}", "",
             f"- steps: {result.step}, wall time: {result.seconds / 60:.1f} min",
             f"- latent_scale_factor: {scale:.4f} (healthy final_latent_stats/std ~ "
             f"{1 / scale:.3f})", f"- scenario: **{result.verdict}**", "",
             "| vital sign | final | guide's healthy range |", "|---|---|---|"]
    for tag, healthy in _ROWS:
        if tag in vitals:
            lines.append(f"| `{tag}` | {vitals[tag]:.4g} | {healthy} |")
    lines.append("")
    if result.stopped_by:
        lines.append(f"Stopped early by the critical finding `{result.stopped_by.code}`.")
    for f in result.findings:
        lines.append(f"- **{f.severity}** `{f.code}` (since step {f.step}): {f.message}. "
                     f"Fix: {f.fix}")
    if not result.findings:
        lines.append("No open findings: every vital sign is within the guide's healthy range.")
    lines += ["", f"- samples: {result.grid if result.grid else '(none yet)'}",
              f"- metrics: {run_dir / 'metrics.jsonl'} (TensorBoard: {run_dir / 'tensorboard'})",
              f"- findings: {run_dir / 'findings.jsonl'}",
              f"- checkpoints: {run_dir / 'checkpoints'}",
              f"- report: {run_dir / 'report.md'} and {run_dir / 'report.html'}"]
    return "\n".join(lines) + "\n"


def write_report(result: TrainResult) -> str:
    text = summary_text(result)
    write_text_atomic(result.run_dir / "report.md", text)
    return text
