"""Plots as inline SVG: no plotting dependency, and the HTML report stays one file.

A line plot shows a series over training steps, the guide's good (green) and bad (red) ranges
as shaded bands, and a marker at each step where a finding was raised. A heat map shows the
validation loss over step x noise level.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape

from ldmkit.vitals.signs import Band

WIDTH, HEIGHT = 560, 220
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 28, 36
COLORS = {"good": "#2e7d32", "bad": "#c62828", "warning": "#ef6c00", "critical": "#b71c1c",
          "info": "#1565c0"}


@dataclass(frozen=True)
class Marker:
    step: int
    label: str
    severity: str


def _nice(value: float, span: float) -> str:
    """Enough significant digits to tell apart ticks ``span`` apart (z_std: 0.998 vs 1.002)."""
    extra = math.ceil(math.log10(abs(value) / span)) if value and span > 0 else 0
    return f"{value:.{3 + max(0, extra)}g}"


def _log_scale(values: list[float]) -> bool:
    positive = [v for v in values if v > 0]
    return len(positive) == len(values) and max(positive) / min(positive) > 1e3


def line_plot(title: str, points: list[tuple[float, float]], bands: list[Band],
              markers: list[Marker], x_label: str = "step") -> str:
    """An ``<svg class="plot">`` of ``points`` (x, value) with bands and finding markers."""
    finite = [(s, v) for s, v in points if math.isfinite(v)]
    ys = [v for _, v in finite] or [0.0, 1.0]
    log = _log_scale(ys)
    fy = math.log10 if log else (lambda v: v)
    lo, hi = min(map(fy, ys)), max(map(fy, ys))
    pad = (hi - lo) * 0.1 or abs(hi) * 0.1 or 1.0
    lo, hi = (max(lo - pad, 0.0) if not log and min(ys) >= 0 else lo - pad), hi + pad
    steps = [s for s, _ in points] or [0, 1]
    s0, s1 = min(steps), max(steps) if max(steps) > min(steps) else min(steps) + 1
    w, h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(step: float) -> float:
        return LEFT + (step - s0) / (s1 - s0) * w

    def y(value: float) -> float:
        v = fy(value) if (not log or value > 0) else lo
        return TOP + (1 - (min(max(v, lo), hi) - lo) / (hi - lo)) * h

    parts = [f'<svg class="plot" xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" '
             f'height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
             f'aria-label="{escape(title)}">',
             f'<text x="{LEFT}" y="18" font-size="13" font-weight="bold">{escape(title)}'
             f'{" (log scale)" if log else ""}</text>']
    for band in bands:
        top = y(band.high) if band.high is not None else TOP
        bottom = y(band.low) if band.low is not None and (not log or band.low > 0) else TOP + h
        if bottom - top > 0.5:
            parts.append(f'<rect class="band {band.kind}" x="{LEFT}" y="{top:.1f}" width="{w}" '
                         f'height="{bottom - top:.1f}" fill="{COLORS[band.kind]}" '
                         'fill-opacity="0.10"/>')
    parts.append(f'<rect x="{LEFT}" y="{TOP}" width="{w}" height="{h}" fill="none" '
                 'stroke="#888"/>')
    for frac in (0.0, 0.5, 1.0):
        value = lo + frac * (hi - lo)
        label = 10**value if log else value
        span = label * (1 - 10 ** (-(hi - lo) / 2)) if log else (hi - lo) / 2
        parts.append(f'<text x="{LEFT - 6}" y="{TOP + (1 - frac) * h + 4:.1f}" font-size="10" '
                     f'text-anchor="end">{_nice(label, abs(span))}</text>')
    for step in (s0, s1):
        parts.append(f'<text x="{x(step):.1f}" y="{HEIGHT - 18}" font-size="10" '
                     f'text-anchor="middle">{step:g}</text>')
    parts.append(f'<text x="{LEFT + w / 2}" y="{HEIGHT - 4}" font-size="10" '
                 f'text-anchor="middle">{escape(x_label)}</text>')
    if len(finite) > 1:
        path = " ".join(f"{'M' if i == 0 else 'L'}{x(s):.1f},{y(v):.1f}"
                        for i, (s, v) in enumerate(finite))
        parts.append(f'<path class="series" d="{path}" fill="none" stroke="#1a237e" '
                     'stroke-width="1.5"/>')
    for s, v in finite if len(finite) <= 40 else []:
        parts.append(f'<circle class="series" cx="{x(s):.1f}" cy="{y(v):.1f}" r="2.5" '
                     'fill="#1a237e"/>')
    for m in markers:
        color = COLORS.get(m.severity, "#000")
        parts.append(f'<line class="finding" x1="{x(m.step):.1f}" x2="{x(m.step):.1f}" '
                     f'y1="{TOP}" y2="{TOP + h}" stroke="{color}" stroke-dasharray="4 3">'
                     f'<title>{escape(m.label)}</title></line>')
    parts.append("</svg>")
    return "\n".join(parts)


def heat_color(ratio: float) -> str:
    """Blue (loss gone) through white (as untrained) to red (worse than untrained)."""
    if not math.isfinite(ratio):
        return "#000000"
    if ratio <= 1:
        r = g = round(255 * min(max(ratio, 0.0), 1.0) ** 0.7)
        return f"#{r:02x}{g:02x}ff"
    fade = round(255 * (1 - min(ratio - 1, 0.5) * 2))
    return f"#ff{fade:02x}{fade:02x}"


def heat_map(title: str, rows: list[list[tuple[int, float]]], row_labels: list[str]) -> str:
    """An ``<svg class="plot heatmap">``: one row per noise level (``rows[0]`` at the bottom),
    one column per validation, each cell coloured by its loss over the row's first value, so a
    noise level that lags stays pale while the learned ones turn blue."""
    steps = sorted({s for row in rows for s, _ in row})
    if not steps:
        return ""
    w, h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    cw, ch = w / len(steps), h / len(rows)
    parts = [f'<svg class="plot heatmap" xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" '
             f'height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
             f'aria-label="{escape(title)}">',
             f'<text x="{LEFT}" y="18" font-size="13" font-weight="bold">{escape(title)}</text>']
    for i, (row, label) in enumerate(zip(rows, row_labels, strict=True)):
        values = dict(row)
        first = next((v for _, v in row if math.isfinite(v) and v > 0), float("nan"))
        y = TOP + (len(rows) - 1 - i) * ch
        parts.append(f'<text x="{LEFT - 6}" y="{y + ch / 2 + 3:.1f}" font-size="9" '
                     f'text-anchor="end">{escape(label)}</text>')
        for j, step in enumerate(steps):
            if step not in values:
                continue
            v = values[step]
            parts.append(f'<rect class="series" x="{LEFT + j * cw:.1f}" y="{y:.1f}" '
                         f'width="{cw + 0.3:.1f}" height="{ch + 0.3:.1f}" '
                         f'fill="{heat_color(v / first)}"><title>{escape(label)} step {step}: '
                         f'loss {v:.4g} ({v / first:.0%} of its first)</title></rect>')
    parts.append(f'<rect x="{LEFT}" y="{TOP}" width="{w}" height="{h}" fill="none" '
                 'stroke="#888"/>')
    for step, anchor, x in ((steps[0], "start", LEFT), (steps[-1], "end", LEFT + w)):
        parts.append(f'<text x="{x}" y="{HEIGHT - 18}" font-size="10" '
                     f'text-anchor="{anchor}">{step}</text>')
    parts.append(f'<text x="{LEFT + w / 2}" y="{HEIGHT - 4}" font-size="10" '
                 'text-anchor="middle">step (blue: learned, white: as untrained, red: worse)'
                 '</text>')
    parts.append("</svg>")
    return "\n".join(parts)
