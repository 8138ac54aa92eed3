"""Read logged metrics from any trainer into series ``{tag: [(step, value), ...]}`` of our tags.

The formats (an ldmkit run directory, JSONL, CSV, TensorBoard, an MLflow file store, a W&B
run, ai-toolkit's ``loss_log.db``, SimpleTuner's ``training_metrics.jsonl``) are the table of
``ldmkit.vitals.logs.sources``; a run directory's config is added by ``ldmkit.run.context``.
The trainer that wrote a log is recognised from its tags and its names mapped onto ours
(``ldmkit.vitals.logs.trainers``); the log keeps, for each of our tags, the names it was read
from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ldmkit.vitals import metrics as vm
from ldmkit.vitals.diagnose import Series
from ldmkit.vitals.logs.formats import RawLog, UnreadableLog
from ldmkit.vitals.logs.sources import read_raw
from ldmkit.vitals.logs.trainers import LDMKIT, Trainer, detect, map_tags

__all__ = ["LoadedLog", "UnreadableLog", "loaded", "read_log"]


@dataclass
class LoadedLog:
    series: Series
    source: str
    latent_scale_factor: float | None = None
    trainer: Trainer = LDMKIT
    fmt: str = "ldmkit"
    config: dict[str, Any] = field(default_factory=dict)  # the run's saved hyperparameters
    read_from: dict[str, list[str]] = field(default_factory=dict)  # our tag -> logged names
    notes: list[str] = field(default_factory=list)  # what was read only in part, and why


def _to_series(records: list[tuple[int, str, float]]) -> Series:
    series: Series = {}
    for step, tag, value in records:
        series.setdefault(tag, []).append((step, value))
    for recs in series.values():
        recs.sort(key=lambda r: r[0])
    return series


def read_log(path: str | Path, latent_scale_factor: float | None = None,
             require_values: bool = True) -> LoadedLog:
    """Series and context of ``path``; raises UnreadableLog with a one-line reason.

    ``require_values=False`` accepts a log without loss or sample values (a run's report after
    it stopped before its first log interval)."""
    return loaded(read_raw(Path(path)), path, latent_scale_factor, require_values)


def loaded(raw: RawLog, path: str | Path, latent_scale_factor: float | None = None,
           require_values: bool = True) -> LoadedLog:
    """``raw`` (a ``sources.LogSource``'s read) with its trainer's tags mapped onto ours."""
    trainer = detect({tag for _, tag, _ in raw.records})
    mapped = map_tags(trainer, raw.records, raw.config)
    series = _to_series(mapped.records)
    judged = (vm.LOSS, vm.LOSS_SMOOTHED, vm.PAIRWISE_PREFIX + "mean")
    if require_values and not any(tag in series for tag in judged):
        found = sorted({tag for _, tag, _ in raw.records})
        raise UnreadableLog(f"'{path}' has no loss or sample-diversity values to diagnose "
                            f"(tags found: {', '.join(found[:8]) or 'none'})")
    logged = [v for _, v in series.get(vm.SCALE_FACTOR, []) if math.isfinite(v)]
    return LoadedLog(series, raw.source, logged[-1] if logged else latent_scale_factor, trainer,
                     raw.fmt, raw.config, mapped.read_from, raw.notes + mapped.notes)
