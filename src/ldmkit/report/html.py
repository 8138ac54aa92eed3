"""``ldmkit report``: one self-contained HTML file per run, to look at rather than read.

A plot per vital sign with the guide's good and bad ranges shaded and a marker where each
finding was raised, the scenario and the findings with their fixes, sample grids over training,
the autoencoder's reconstructions, eval figures when present, and the config. Images are
embedded (base64) and plots are inline SVG, so the file can be mailed or attached to an issue.
A small script marks ``body[data-plots-rendered]`` once the browser has laid the plots out,
which the end-to-end test reads from headless Chromium.
"""

from __future__ import annotations

import base64
from html import escape
from pathlib import Path

from ldmkit.config.untrusted import brief
from ldmkit.errors import LdmkitError
from ldmkit.platform.files import check_output, check_plain_tree, read_regular, write_text_atomic
from ldmkit.run.context import read_run
from ldmkit.run.layout import REPORT_HTML, RunDir
from ldmkit.vitals import metrics as vm
from ldmkit.vitals.logs.metrics_jsonl import json_objects
from ldmkit.vitals.logs.readers import LoadedLog
from ldmkit.vitals.logs.trainers import LDMKIT
from ldmkit.vitals.offline import diagnose_loaded
from ldmkit.vitals.signs import PLOTTED, SWEPT, bands

from .keep import keep_section
from .svg import Marker, heat_map, line_plot

REPORT_FILE = REPORT_HTML


def shown_tags(series: dict) -> list[str]:
    """The vital signs present in ``series`` in the guide's order, then any ``eval/*`` (guided
    figures, ``TAG@cfgG``, have their own section)."""
    return [t for t in PLOTTED if t in series] + sorted(
        t for t in series if t.startswith(vm.EVAL_PREFIX) and "@cfg" not in t and t not in PLOTTED)


def guidance_sweep(series: dict) -> dict[str, list[tuple[float, float]]]:
    """``eval/*`` against the guidance scale, from the latest step with guided figures
    (``ldmkit eval --guidance 1,2,4``; scale 1 is logged under the plain tag)."""
    guided = {t: v for t, v in series.items() if t.split("@cfg")[0] in SWEPT and "@cfg" in t}
    if not guided:
        return {}
    step = max(s for records in guided.values() for s, _ in records)
    sweep: dict[str, list[tuple[float, float]]] = {}
    for tag in SWEPT:
        points = [(float(t.split("@cfg")[1]), v) for t, records in guided.items()
                  if t.split("@cfg")[0] == tag for s, v in records if s == step]
        points += [(1.0, v) for s, v in series.get(tag, []) if s == step]
        if len(points) > 1:
            sweep[tag] = sorted(points)
    return sweep


def _guidance_section(series: dict) -> str:
    sweep = guidance_sweep(series)
    if not sweep:
        return ""
    plots = "".join(line_plot(tag, points, [], [], "guidance scale")
                    for tag, points in sweep.items())
    return ("<h2>Guidance sweep</h2><p>Sample quality per classifier-free guidance scale "
            "(<code>ldmkit eval --guidance</code>): stronger guidance usually buys precision, "
            "class accuracy and prompt adherence (clip score, prompt retrieval) with recall."
            f'</p><div class="plots">{plots}</div>')


STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;max-width:1200px;color:#222}
h1{font-size:22px} h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}
.scenario{display:inline-block;padding:2px 10px;border-radius:10px;color:#fff}
.healthy{background:#2e7d32} .other{background:#c62828} .too_early{background:#757575}
table{border-collapse:collapse;font-size:13px} td,th{border:1px solid #ddd;padding:4px 8px;
vertical-align:top} .plots{display:flex;flex-wrap:wrap;gap:8px}
.critical{color:#b71c1c;font-weight:bold} .warning{color:#ef6c00;font-weight:bold}
figure{display:inline-block;margin:6px} figcaption{font-size:12px;text-align:center}
img{image-rendering:pixelated;width:256px} pre{background:#f6f6f6;padding:8px;font-size:12px}
.checkpoints img{width:180px}
"""
CHECK = """
addEventListener("load", () => {
  const plots = [...document.querySelectorAll("svg.plot")];
  const drawn = plots.filter(p => p.getBBox().width > 0 &&
    [...p.querySelectorAll(".series")].some(e => e.getBoundingClientRect().width > 0 ||
                                              e.getBoundingClientRect().height > 0));
  const images = [...document.images];
  document.body.dataset.plotsTotal = plots.length;
  document.body.dataset.plotsRendered = drawn.length;
  document.body.dataset.imagesTotal = images.length;
  document.body.dataset.imagesRendered = images.filter(i => i.complete && i.naturalWidth > 0).length;
});
"""


def _img(path: Path, caption: str) -> str:
    data = base64.b64encode(read_regular(path)).decode()
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{escape(caption)}">'
            f"<figcaption>{escape(caption)}</figcaption></figure>")


def _raised(run_dir: Path) -> list[dict]:
    path = RunDir(run_dir).findings
    if not path.is_file():
        return []
    return [event for event in json_objects(path) if event.get("event") == "raised"]


def _changes(run_dir: Path) -> list[tuple[int, str]]:
    """What changed mid-run (``RUN/changes.jsonl``: ``--resume --set``, ``ldmkit fix``, a
    repair), as (step, words)."""
    changes = []
    for record in RunDir(run_dir).change_records():
        step = record.get("at_step")
        if record.get("fix"):
            what = (f"{record.get('by', 'ldmkit fix')} of {', '.join(map(str, record['fix']))}: "
                    + ", ".join(f"{k} = {v}" for k, v in dict(record.get("changes", {})).items())
                    + (f"; continued in {record['new_run']}" if record.get("new_run") else ""))
        else:
            what = "resumed with " + ", ".join(
                f"{k} {brief(a)} -> {brief(b)}" for k, (a, b) in dict(record.get("changed", {})).items())
        changes.append((step if isinstance(step, int) else 0, what))
    return changes


def _grids(run_dir: Path) -> list[tuple[Path, str]]:
    samples = RunDir(run_dir).samples_root
    if not samples.is_dir():
        return []
    during = sorted(samples.glob("step_*/grid.png"))
    other = sorted(p for p in samples.glob("*/grid.png") if not p.parent.name.startswith("step_"))
    return [(p, p.parent.name.replace("_", " ")) for p in [*during, *other]]


def _prompts_line(run_dir: Path) -> str:
    """A text-conditional run's grids have a column per prompt: which, left to right."""
    try:
        prompts = RunDir(run_dir).prompts()
    except LdmkitError:
        return "<p>The grids' prompts: <code>prompts.json</code> is damaged.</p>"
    if not prompts:
        return ""
    items = "".join(f"<li>{escape(p)}</li>" for p in prompts)
    return f"<p>One prompt per column, left to right:</p><ol>{items}</ol>"


def _findings_table(findings: list, title: str) -> str:
    if not findings:
        return f"<p>{escape(title)}: none.</p>"
    rows = "".join(
        f'<tr><td class="{escape(f["severity"])}">{escape(f["severity"])}</td>'
        f'<td><code>{escape(f["code"])}</code></td><td>{f["step"]}</td>'
        f'<td>{f["value"]:.4g}</td><td>{escape(f["message"])}</td><td>{escape(f["fix"])}</td></tr>'
        for f in findings)
    return (f"<p>{escape(title)}:</p><table><tr><th>severity</th><th>code</th><th>step</th>"
            f"<th>value</th><th>diagnosis</th><th>fix</th></tr>{rows}</table>")


def noise_level_map(series: dict) -> str:
    """The validation loss over step x noise level (``metrics.noise_levels_in``), or ''."""
    levels = vm.noise_levels_in(series)
    rows = [series[level.tag] for level in levels]
    if not any(rows):
        return ""
    return heat_map("validation loss per noise level", rows, [level.label for level in levels])


def _noise_level_section(log: LoadedLog, probe: bool) -> str:
    heat = noise_level_map(log.series)
    if not heat:
        return ""
    what = ("The probe's fixed points (ldmkit probe): held-out images when given, else the "
            "training images, one column per checkpoint" if probe else
            "Fixed held-out points (ldmkit.training.held_out), raw weights" if
            log.trainer is LDMKIT else f"{log.trainer.label}'s validation loss: "
            f"{log.trainer.validation or 'as the trainer logged it'}")
    return (f"<h2>Validation loss per noise level</h2><p>{escape(what)}; each row is coloured "
            "by its loss over its first validation. High t (top) is where an image's structure "
            "is decided, low t (bottom) its detail; the least noisy levels stay pale even in "
            f"healthy runs (noise is hard to tell from detail there).</p>{heat}")


def _changes_section(changes: list[tuple[int, str]]) -> str:
    if not changes:
        return ""
    rows = "".join(f"<tr><td>{step}</td><td>{escape(what)}</td></tr>" for step, what in changes)
    return (f"<h2>Changes during the run</h2><p>RUN/changes.jsonl: each resume that changed a "
            f"setting, and each fix or repair.</p><table><tr><th>step</th><th>change</th></tr>"
            f"{rows}</table>")


def render_html(run_dir: Path) -> str:
    log, ctx = read_run(run_dir, require_values=False)
    diagnosis = diagnose_loaded(log, ctx)
    raised, changes = _raised(run_dir), _changes(run_dir)
    plots = []
    for tag in shown_tags(log.series):
        markers = [Marker(e["step"], f'{e["severity"]} {e["code"]}: {e["message"]}', e["severity"])
                   for e in raised if e.get("metric") == tag]
        markers += [Marker(step, what, "info") for step, what in changes]
        plots.append(line_plot(tag, log.series[tag], bands(tag, ctx), markers))
    evals = {t: v[-1][1] for t, v in log.series.items() if t.startswith(vm.EVAL_PREFIX) and v}
    recon = RunDir(run_dir).autoencoder / "reconstructions.png"
    config = RunDir(run_dir).config
    css = "healthy" if diagnosis.scenario == "healthy" else (
        "too_early" if diagnosis.scenario == "too_early" else "other")
    scale = "unknown" if log.latent_scale_factor is None else f"{log.latent_scale_factor:.4g}"
    probe = keep_section(run_dir, log.series, _img)
    title = ("ldmkit probe" if probe else "ldmkit run" if log.trainer is LDMKIT
             else escape(log.trainer.label))
    sections = [
        f"<h1>{title} "
        f"{escape(run_dir.name)}</h1>",
        f'<p>scenario: <span class="scenario {css}">{escape(diagnosis.verdict)}</span> · '
        f"latent_scale_factor {scale} · last step "
        f"{max((s for v in log.series.values() for s, _ in v), default=0)}</p>",
        probe,  # a probe's answer first: which checkpoint to keep
        "<h2>Findings</h2>",
        _findings_table([f.to_dict() for f in diagnosis.findings if f.cleared_at is None],
                        "Open at the end of the log"),
        *([_findings_table([f.to_dict() for f in cleared], "Critical, then cleared (by a "
                           "rollback, a fix or a repair)")] if (cleared := [
                               f for f in diagnosis.findings if f.cleared_at is not None]) else []),
        _findings_table(raised, "Raised during training (findings.jsonl)"),
        _noise_level_section(log, bool(probe)),
        _changes_section(changes),
        "<h2>Vital signs</h2><p>Green: the guide's good range; red: its bad range; dashed "
        "lines: where a finding was raised (hover for the diagnosis), blue: where the run's "
        "settings changed.</p>",
        f'<div class="plots">{"".join(plots)}</div>',
    ]
    if evals:
        rows = "".join(f"<tr><td><code>{escape(t)}</code></td><td>{v:.4g}</td></tr>"
                       for t, v in sorted(evals.items()))
        sections.append(f"<h2>Evaluation</h2><table>{rows}</table>")
    sections.append(_guidance_section(log.series))
    grids = [] if probe else _grids(run_dir)
    if grids:
        sections.append("<h2>Samples over training</h2>" + _prompts_line(run_dir)
                        + "".join(_img(p, c) for p, c in grids))
    if recon.is_file():
        sections.append("<h2>Autoencoder reconstructions</h2><p>Top: data; bottom: "
                        "reconstruction.</p>" + _img(recon, "reconstructions"))
    if config.is_file():
        text = read_regular(config).decode("utf-8", "replace")
        sections.append(f"<h2>Config</h2><pre>{escape(text)}</pre>")
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>ldmkit '
            f"{escape(run_dir.name)}</title><style>{STYLE}</style></head><body>"
            f'{"".join(sections)}<script>{CHECK}</script></body></html>')


def write_html_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Render ``run_dir``'s report to ``out`` (default ``run_dir/report.html``)."""
    run_dir = Path(run_dir)
    if out is not None:
        check_output(Path(out), "--out", directory=False)
    path = Path(out) if out else RunDir(run_dir).report_html
    check_plain_tree(run_dir)  # what the report embeds stays inside the run
    write_text_atomic(path, render_html(run_dir))
    return path
