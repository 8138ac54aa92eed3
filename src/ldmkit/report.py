"""End-of-run summary: the final vital signs next to the guide's healthy ranges, and where things are.

Written to ``run_dir/report.md`` and printed. The full diagnosis (rules over windows, findings,
scenarios) is ``ldmkit.vitals``' job; this is the at-a-glance view.
"""

from __future__ import annotations

from pathlib import Path

from ldmkit.vitals import metrics as vm

# (tag, guide's healthy range in words), in the guide's order.
_ROWS = (
    (vm.LOSS, "starts ~1.0, decreases to 0.1-0.4"),
    (vm.GRAD_NORM, "stable, 0.1-10"),
    (vm.LEARNING_RATE, "as configured"),
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


def summary_text(run_dir: Path, step: int, scale: float, vitals: dict[str, float],
                 grid: Path | None, seconds: float) -> str:
    lines = [f"# ldmkit run {run_dir.name}", "",
             f"- steps: {step}, wall time: {seconds / 60:.1f} min",
             f"- latent_scale_factor: {scale:.4f} (healthy final_latent_stats/std ~ "
             f"{1 / scale:.3f})", "", "| vital sign | final | guide's healthy range |",
             "|---|---|---|"]
    for tag, healthy in _ROWS:
        if tag in vitals:
            lines.append(f"| `{tag}` | {vitals[tag]:.4g} | {healthy} |")
    lines += ["", f"- samples: {grid if grid else '(none yet)'}",
              f"- metrics: {run_dir / 'metrics.jsonl'} (TensorBoard: {run_dir / 'tensorboard'})",
              f"- checkpoints: {run_dir / 'checkpoints'}",
              f"- report: {run_dir / 'report.md'}"]
    return "\n".join(lines) + "\n"


def write_report(run_dir: Path, step: int, scale: float, vitals: dict[str, float],
                 grid: Path | None, seconds: float) -> str:
    text = summary_text(run_dir, step, scale, vitals, grid, seconds)
    (run_dir / "report.md").write_text(text)
    return text
