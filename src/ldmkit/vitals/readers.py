"""Read logged metrics from any trainer into series ``{tag: [(step, value), ...]}``.

Accepted: an ldmkit run directory (its ``metrics.jsonl``; ``ldmkit.diagnosis`` adds its config), a
``metrics.jsonl``, a CSV
with columns ``step,tag,value``, a TensorBoard event file, or a directory holding event files
(read with TensorBoard's own loader). Other trainers' tag names are mapped onto ours by ``ALIASES``.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

from ldmkit.errors import LdmkitError
from ldmkit.vitals import metrics as vm
from ldmkit.vitals.diagnose import Series

# other trainer's tag -> ours; a canonical tag, when logged, wins over its aliases.
ALIASES: dict[str, str] = {
    # the guide's own train/metrics block
    "loss": vm.LOSS, "train/loss": vm.LOSS, "grad_norm": vm.GRAD_NORM,
    "train/grad_norm": vm.GRAD_NORM, "learning_rate": vm.LEARNING_RATE,
    "train/learning_rate": vm.LEARNING_RATE,
    "t_mean": vm.T_MEAN, "cos_eps_mean": vm.COS_EPS, "z_std": vm.Z_STD,
    # diffusers' training examples
    "train_loss": vm.LOSS, "step_loss": vm.LOSS, "lr": vm.LEARNING_RATE,
    # CompVis latent-diffusion (PyTorch Lightning)
    "train/loss_simple": vm.LOSS, "train/loss_simple_step": vm.LOSS, "lr_abs": vm.LEARNING_RATE,
}


class UnreadableLog(LdmkitError):
    """A metrics source is missing, malformed or empty."""


@dataclass
class LoadedLog:
    series: Series
    source: str
    latent_scale_factor: float | None = None


def _read_jsonl(path: Path) -> list[tuple[int, str, float]]:
    records = []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            records.append((int(rec["step"]), str(rec["tag"]), float(rec["value"])))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, OverflowError):
            if number == len(lines):  # a run killed mid-write leaves a torn last line
                break
            raise UnreadableLog(f"'{path}' line {number} is not a {{step, tag, value}} JSON "
                                "object; fix or delete that line") from None
    return records


def _read_csv(path: Path) -> list[tuple[int, str, float]]:
    with path.open(newline="", encoding="utf-8", errors="replace") as fh:
        reader = csv.DictReader(fh)
        try:
            columns = [c.strip() for c in reader.fieldnames or []]
            if not {"step", "tag", "value"} <= set(columns):
                raise UnreadableLog(f"CSV '{path}' has columns {columns[:6]}; it needs step,tag,value")
            records = []
            for number, row in enumerate(reader, 2):
                row = {k.strip(): v for k, v in row.items() if k}
                try:
                    records.append((int(float(row["step"])), row["tag"].strip(),
                                    float(row["value"])))
                except (TypeError, ValueError, AttributeError, OverflowError):
                    raise UnreadableLog(f"CSV '{path}' line {number} has a bad step or value; "
                                        "fix or delete that line") from None
        except csv.Error as exc:
            raise UnreadableLog(f"'{path}' is not a readable CSV ({exc}); export step,tag,value "
                                "rows") from None
    return records


def _read_tensorboard(files: list[Path]) -> list[tuple[int, str, float]]:
    """One accumulator per directory, so restarts purged with ``purge_step`` read as TensorBoard
    shows them (no duplicated steps); a single file is read alone."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = []
    sources = sorted({f.parent for f in files}) if len(files) > 1 else files
    for file in sources:
        acc = EventAccumulator(str(file), size_guidance={"scalars": 0})
        try:
            acc.Reload()
            acc.FirstEventTimestamp()  # every real event file starts with a version event
        except Exception as exc:  # TensorBoard raises DataLossError, ValueError and others
            raise UnreadableLog(f"'{file}' is not a readable TensorBoard event log "
                                f"({type(exc).__name__}); pass the run's events.out.tfevents.* "
                                "file or its directory") from None
        for tag in acc.Tags().get("scalars", []):
            records.extend((e.step, tag, float(e.value)) for e in acc.Scalars(tag))
    return records


def _to_series(records: list[tuple[int, str, float]]) -> Series:
    raw: Series = {}
    for step, tag, value in records:
        raw.setdefault(tag, []).append((step, value))
    series: Series = {}
    for tag, recs in raw.items():
        target = ALIASES.get(tag, tag)
        if target != tag and target in raw:
            continue
        series.setdefault(target, []).extend(recs)
    for recs in series.values():
        recs.sort(key=lambda r: r[0])
    return series


def _event_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if "tfevents" in p.name and p.is_file())


def read_log(path: str | Path, latent_scale_factor: float | None = None,
             require_values: bool = True) -> LoadedLog:
    """Series and context of ``path``; raises UnreadableLog with a one-line reason.

    ``require_values=False`` accepts a log without loss or sample values (a run's report after
    it stopped before its first log interval)."""
    path = Path(path)
    if not path.exists():
        raise UnreadableLog(f"'{path}' does not exist; pass a run directory, metrics.jsonl, "
                            "CSV or TensorBoard log")
    if path.is_dir():
        if (path / "metrics.jsonl").is_file():
            records = _read_jsonl(path / "metrics.jsonl")
        elif files := _event_files(path):
            records = _read_tensorboard(files)
        else:
            raise UnreadableLog(f"'{path}' holds neither metrics.jsonl nor TensorBoard event files")
    elif path.suffix == ".jsonl":
        records = _read_jsonl(path)
    elif path.suffix == ".csv":
        records = _read_csv(path)
    elif "tfevents" in path.name:
        records = _read_tensorboard([path])
    else:
        raise UnreadableLog(f"'{path}': unknown format; expected .jsonl, .csv or a TensorBoard "
                            "events.out.tfevents.* file")
    series = _to_series(records)
    if require_values and not any(tag in series for tag in (vm.LOSS, vm.PAIRWISE_PREFIX + "mean")):
        raise UnreadableLog(f"'{path}' has no loss or sample-diversity values to diagnose "
                            f"(tags found: {', '.join(sorted(series)[:8]) or 'none'})")
    logged = [v for _, v in series.get(vm.SCALE_FACTOR, []) if math.isfinite(v)]
    return LoadedLog(series, str(path), logged[-1] if logged else latent_scale_factor)
