"""A probe directory's answer to "which checkpoint do I keep?" (``vitals.keep``), and the
report's section that shows it: the choice and why, each checkpoint's figures beside the
findings that spoil it, and every checkpoint's sample grid side by side (a column per prompt,
a row per seed), so the reason can be seen as well as read.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from html import escape
from pathlib import Path

from ldmkit.run.context import read_run
from ldmkit.run.layout import RunDir
from ldmkit.vitals import tags as vm
from ldmkit.vitals.context import Series
from ldmkit.vitals.keep import Choice, choose


def measured(settings: dict) -> dict[int, str]:
    """Step -> checkpoint name of the checkpoints a probe measured (0: the base)."""
    return {e["step"]: str(e.get("name", e["step"])) for e in settings.get("measured", [])
            if isinstance(e, dict) and type(e.get("step")) is int}


def keep_choice(out: Path) -> Choice:
    """Which of a probe directory's checkpoints to keep, from its log and ``probe.json``."""
    settings = RunDir(out).probe_settings() or {}
    log, ctx = read_run(out, require_values=False)
    names = measured(settings)
    return choose(log.series, ctx, sorted(names), names)


def _value(series: Series, tag: str, step: int, scale: float = 1.0) -> str:
    value = next((v for s, v in series.get(tag, []) if s == step), None)
    return "" if value is None or not math.isfinite(value) else f"{value * scale:.4g}"


def keep_section(out: Path, series: Series, image: Callable[[Path, str], str]) -> str:
    """The section, or '' when ``out`` is not a probe; ``image(path, caption)`` embeds a PNG."""
    settings = RunDir(out).probe_settings()
    if settings is None:
        return ""
    names, choice = measured(settings), keep_choice(out)
    what = settings.get("what", {})
    scale = float(settings.get("latent_scale_factor") or 1.0) ** 2  # normalized units
    held = bool(what.get("holdout"))
    rows = []
    for judged in choice.judged:
        step = judged.step
        mark = ' style="background:#e8f5e9"' if step == choice.step else ""
        rows.append(
            f"<tr{mark}><td>{escape(names.get(step, str(step)))}</td><td>{step}</td>"
            f"<td>{_value(series, vm.VAL_LOSS, step)}</td>"
            f"<td>{_value(series, vm.VAL_TRAIN_LOSS if held else vm.VAL_LOSS, step)}</td>"
            f"<td>{_value(series, vm.COPY_SHARE, step)}</td>"
            f"<td>{_value(series, vm.NEAREST_PREFIX + 'median', step)}</td>"
            f"<td>{_value(series, vm.LEAST_DIVERSE_PROMPT_MSE, step, scale)}</td>"
            f"<td>{escape(', '.join(judged.spoilers))}</td></tr>")
    loss_name = "held-out loss" if held else "loss (training images)"
    table = (f"<table><tr><th>checkpoint</th><th>step</th><th>{loss_name}</th>"
             "<th>training images' loss</th><th>copy share</th><th>nearest/second ratio "
             "(median)</th><th>least diverse prompt (normalized MSE)</th><th>spoiled by</th>"
             f"</tr>{''.join(rows)}</table>")
    grids = "".join(image(RunDir(out).samples(step) / "grid.png", names.get(step, str(step)))
                    for step in sorted(names)
                    if (RunDir(out).samples(step) / "grid.png").is_file())
    prompts = RunDir(out).prompts() or []
    listed = "".join(f"<li>{escape(p)}</li>" for p in prompts)
    return (f"<h2>Which checkpoint to keep</h2><p><b>{escape(choice.reason)}</b></p>"
            f"<p>{escape(str(settings.get('pipeline', '')))} at {what.get('base', '')}; "
            f"{what.get('points')} fixed points, {what.get('seeds')} seeds of each prompt, "
            f"{what.get('steps')} sampling steps at guidance {what.get('guidance')}. A checkpoint "
            "is spoiled from the first one whose samples copy training images, collapse onto "
            "one image per prompt, or whose held-out loss rises while the training images' "
            f"falls.</p>{table}<h2>Samples of each checkpoint</h2><p>Same noise in every "
            f"grid; one prompt per column, one seed per row:</p><ol>{listed}</ol>"
            f'<div class="plots checkpoints">{grids}</div>')
