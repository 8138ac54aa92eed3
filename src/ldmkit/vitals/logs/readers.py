"""Read logged metrics from any trainer into series ``{tag: [(step, value), ...]}`` of our tags.

Accepted: an ldmkit run directory (its ``metrics.jsonl``; ``ldmkit.run.context`` adds its config),
JSONL, CSV, TensorBoard, an MLflow file store (``ldmkit.vitals.logs.formats``), a W&B run
(``ldmkit.vitals.logs.wandb_files``), ai-toolkit's ``loss_log.db`` and SimpleTuner's
``training_metrics.jsonl`` (``ldmkit.vitals.logs.trainer_files``). The
trainer that wrote it is recognised from its tags and its names mapped onto ours
(``ldmkit.vitals.logs.trainers``); the log keeps, for each of our tags, the names it was read from.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ldmkit.platform.files import is_hidden, open_regular
from ldmkit.vitals import metrics as vm
from ldmkit.vitals.diagnose import Series
from ldmkit.vitals.logs import wandb_files
from ldmkit.vitals.logs.formats import (
    RawLog,
    UnreadableLog,
    event_files,
    is_mlflow,
    read_csv,
    read_mlflow,
    read_tensorboard,
)
from ldmkit.vitals.logs.metrics_jsonl import METRICS_FILE, read_ldmkit_jsonl
from ldmkit.vitals.logs.trainer_files import (
    AITK_DB,
    SIMPLETUNER_JSONL,
    is_simpletuner_line,
    read_aitk,
    read_simpletuner,
)
from ldmkit.vitals.logs.trainers import LDMKIT, Trainer, detect, map_tags

__all__ = ["LoadedLog", "UnreadableLog", "read_log"]


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


def _first_line(path: Path) -> str:
    with open_regular(path) as fh:
        return fh.readline(4096).decode("utf-8", errors="replace")


DIRECTORY_READERS: tuple[tuple[Callable[[Path], bool], Callable[[Path], RawLog]], ...] = (
    (lambda p: (p / METRICS_FILE).exists(), lambda p: read_ldmkit_jsonl(p / METRICS_FILE)),
    (lambda p: (p / AITK_DB).exists(), lambda p: read_aitk(p / AITK_DB)),
    (lambda p: (p / SIMPLETUNER_JSONL).exists(), lambda p: read_simpletuner(p / SIMPLETUNER_JSONL)),
    (wandb_files.is_wandb, wandb_files.read_dir),
    (is_mlflow, read_mlflow),
    (lambda p: bool(event_files(p)), lambda p: read_tensorboard(event_files(p), p)),
)


SEARCH_DEPTH = 3  # a project folder holding wandb/, mlruns/0/<run>, output/<job>/loss_log.db


def _reads_itself(path: Path) -> bool:
    """A folder a directory reader takes as it is (TensorBoard: event files right in it)."""
    return any(accepts(path) for accepts, _ in DIRECTORY_READERS[:-1]) or any(
        "tfevents" in p.name and p.is_file() and not p.is_symlink() for p in path.iterdir())


def last_written(path: Path, limit: int = 2000) -> float:
    """When a log was last written: its newest file's time. A folder's own time changes only
    when a file is added, and a SQLite reader creates an empty ``-wal`` and writes the
    ``-shm``, so none of those counts."""
    if not path.is_dir():
        return path.stat().st_mtime
    times = [0.0]
    files = (p for p in path.rglob("*") if p.is_file() and not p.is_symlink()
             and not p.name.endswith("-shm"))
    for count, file in enumerate(files):
        if count >= limit:
            break
        stat = file.stat()
        if stat.st_size or not file.name.endswith("-wal"):
            times.append(stat.st_mtime)
    return max(times)


def find_logs(root: Path, depth: int = SEARCH_DEPTH) -> list[Path]:
    """The logs below ``root`` where users point (the project folder a trainer wrote into):
    folders a directory reader reads and k-diffusion's ``*_metrics.csv``, at most ``depth``
    levels down, links and hidden folders never entered; newest first."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
        if here != root and _reads_itself(here):
            found.append(here)
            dirnames[:] = []
            continue
        found += [here / f for f in sorted(filenames) if f.endswith("_metrics.csv")
                  and not (here / f).is_symlink()]
        if len(here.relative_to(root).parts) + 1 >= depth:
            dirnames[:] = []
    return sorted(found, key=last_written, reverse=True)


def read_raw(path: Path) -> RawLog:
    """The records of ``path``, whichever format it is; UnreadableLog with a one-line reason.

    The readers parse untrusted files and say where one is damaged; what a reader did not
    foresee (a value of a type no writer produces) still ends here as a one-line error naming
    the file, never a traceback."""
    try:
        return _read_any(path)
    except (ValueError, TypeError, KeyError, OverflowError, RecursionError, UnicodeError) as exc:
        raise UnreadableLog(f"'{path}' is damaged ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:120] if str(exc) else 'no detail'}); "
                            "repair it or pass another log") from None


def _read_any(path: Path) -> RawLog:
    if not path.exists():
        raise UnreadableLog(f"'{path}' does not exist; pass a run directory, metrics.jsonl, CSV, "
                            "TensorBoard log, W&B run or MLflow mlruns/ folder")
    if path.is_dir():
        for accepts, read in DIRECTORY_READERS:
            if accepts(path):
                return read(path)
        logs = find_logs(path)
        if not logs:
            raise UnreadableLog(f"'{path}' holds no metrics.jsonl, {AITK_DB}, "
                                f"{SIMPLETUNER_JSONL}, TensorBoard event files, W&B run or "
                                f"MLflow run (searched {SEARCH_DEPTH} levels down)")
        raw = _read_any(logs[0])
        others = ", ".join(f"'{log}'" for log in logs[1:])
        raw.notes.insert(0, f"'{path}' holds {len(logs)} log{'s' * (len(logs) > 1)}: read the "
                            f"newest, '{logs[0]}'" + (f"; also found {others[:400]}"
                                                      if others else ""))
        return raw
    if path.suffix == ".wandb":
        return wandb_files.read_transaction_log(path)
    if path.suffix == ".db":
        return read_aitk(path)
    if path.suffix == ".jsonl":
        first = _first_line(path)
        if path.name == "wandb-history.jsonl" or '"_step"' in first:
            return wandb_files.read_history(path)
        if path.name == SIMPLETUNER_JSONL or is_simpletuner_line(first):
            return read_simpletuner(path)
        return read_ldmkit_jsonl(path)
    if path.suffix == ".csv":
        return read_csv(path)
    if "tfevents" in path.name:
        return read_tensorboard([path])
    raise UnreadableLog(f"'{path}': unknown format; expected .jsonl, .csv, ai-toolkit's "
                        f"{AITK_DB}, a TensorBoard events.out.tfevents.* file, a W&B run or an "
                        "MLflow mlruns/ folder")


def read_log(path: str | Path, latent_scale_factor: float | None = None,
             require_values: bool = True) -> LoadedLog:
    """Series and context of ``path``; raises UnreadableLog with a one-line reason.

    ``require_values=False`` accepts a log without loss or sample values (a run's report after
    it stopped before its first log interval)."""
    raw = read_raw(Path(path))
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
