"""The log formats ldmkit reads, one ``LogFormat`` each: what to pass, how a folder or a file
is told to be one, and the ``LogSource`` that reads it and is then polled for what the trainer
wrote since. ``diagnose``, ``report`` and ``watch`` open every log here; the CLI's help and the
"unreadable log" errors list the formats from ``FORMATS``.

Sources read only what was added where a format is appended record by record (JSON lines;
ai-toolkit's SQLite rows, re-read whole when a resumed run rewrote its steps); TensorBoard,
W&B's transaction log, MLflow and CSV files are read again whole when one of their files was
written since the last poll.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ldmkit.platform.files import is_hidden, open_regular
from ldmkit.vitals.logs import wandb_files
from ldmkit.vitals.logs.formats import (
    JsonLines,
    RawLog,
    Record,
    UnreadableLog,
    event_files,
    is_mlflow,
    read_csv,
    read_mlflow,
    read_tensorboard,
)
from ldmkit.vitals.logs.metrics_jsonl import METRICS_FILE, metrics_reader
from ldmkit.vitals.logs.trainer_files import (
    AITK_DB,
    SIMPLETUNER_JSONL,
    AitkMark,
    is_simpletuner_line,
    read_aitk,
    simpletuner_config,
    simpletuner_row,
)

SEARCH_DEPTH = 3  # a project folder holding wandb/, mlruns/0/<run>, output/<job>/loss_log.db
DAMAGE = (ValueError, TypeError, KeyError, OverflowError, RecursionError, UnicodeError)


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


def damaged(path: Path, exc: Exception) -> UnreadableLog:
    detail = str(exc).splitlines()[0][:120] if str(exc) else "no detail"
    return UnreadableLog(f"'{path}' is damaged ({type(exc).__name__}: {detail}); repair it or "
                         "pass another log")


class LogSource:
    """A log read, then polled as the trainer writes it: ``poll`` gives the whole log read so
    far, or None when nothing was written since the last poll. This base reads the log again
    whole when one of its files was written. A file the reader did not foresee (a value of a
    type no writer produces) ends as a one-line ``UnreadableLog`` naming it, never a traceback."""

    def __init__(self, path: Path, read: Callable[[Path], RawLog] | None = None):
        self.path, self.read, self.stamp = path, read, None
        self.notes: list[str] = []  # said with every read (how a searched folder was resolved)

    def poll(self) -> RawLog | None:
        stamp = last_written(self.path)
        if stamp == self.stamp:
            return None
        try:
            raw = self._read()
        except DAMAGE as exc:
            raise damaged(self.path, exc) from None
        self.stamp = stamp
        raw.notes[:0] = self.notes
        return raw

    def _read(self) -> RawLog:
        assert self.read is not None
        return self.read(self.path)


class JsonLinesSource(LogSource):
    """A JSON-lines log: each poll parses only the lines added (``JsonLines``' policy: a torn
    last line waits for the next poll)."""

    def __init__(self, lines: JsonLines[Record], fmt: str,
                 config: Callable[[Path], dict[str, Any]] = lambda _: {}):
        super().__init__(lines.path)
        self.lines, self.fmt, self.config = lines, fmt, config
        self.records: list[Record] = []

    def _read(self) -> RawLog:
        self.records += self.lines.poll()
        return RawLog(list(self.records), self.fmt, str(self.path), self.config(self.path))


class AitkSource(LogSource):
    """ai-toolkit's ``loss_log.db``: each poll reads the rows of steps after the last one read,
    or all of them again when a resumed run rewrote the steps already read."""

    def __init__(self, path: Path):
        super().__init__(path)
        self.records: list[Record] = []
        self.mark: AitkMark | None = None

    def _read(self) -> RawLog:
        raw, self.mark, whole = read_aitk(self.path, self.mark)
        self.records = raw.records if whole else self.records + raw.records
        return RawLog(list(self.records), raw.fmt, raw.source)


@dataclass(frozen=True)
class LogFormat:
    name: str
    what: str  # what to pass, in the help and the errors
    folder: Callable[[Path], bool] | None = None  # a folder it reads as it is
    open_folder: Callable[[Path], LogSource] | None = None
    file: Callable[[Path, str], bool] | None = None  # a file (its path, its first line)
    open_file: Callable[[Path], LogSource] | None = None
    suffixes: tuple[str, ...] = field(default=())  # files the search reads (as *_metrics.csv)


def _ldmkit(path: Path) -> LogSource:
    return JsonLinesSource(metrics_reader(path), "ldmkit")


def _simpletuner(path: Path) -> LogSource:
    return JsonLinesSource(JsonLines(path, simpletuner_row, 'a SimpleTuner metrics record '
                                     '({"step", "metrics": {...}})'), "simpletuner-jsonl",
                           simpletuner_config)


def _wandb_history(path: Path) -> LogSource:
    return LogSource(path, wandb_files.read_history)


def _tensorboard_folder(path: Path) -> LogSource:
    return LogSource(path, lambda p: read_tensorboard(event_files(p), p))


FORMATS: tuple[LogFormat, ...] = (
    LogFormat("ldmkit", "an ldmkit run directory or its metrics.jsonl",
              lambda p: (p / METRICS_FILE).exists(), lambda p: _ldmkit(p / METRICS_FILE)),
    LogFormat("ai-toolkit", f"ai-toolkit's {AITK_DB} or the job folder holding it",
              lambda p: (p / AITK_DB).exists(), lambda p: AitkSource(p / AITK_DB),
              lambda p, _: p.suffix == ".db", AitkSource),
    LogFormat("simpletuner", f"SimpleTuner's {SIMPLETUNER_JSONL} or its output_dir",
              lambda p: (p / SIMPLETUNER_JSONL).exists(),
              lambda p: _simpletuner(p / SIMPLETUNER_JSONL),
              lambda p, first: p.suffix == ".jsonl" and (p.name == SIMPLETUNER_JSONL
                                                         or is_simpletuner_line(first)),
              _simpletuner),
    LogFormat("wandb", "a W&B run (wandb/, a run-* folder, run-<id>.wandb, "
              "wandb-history.jsonl)", wandb_files.is_wandb,
              lambda p: LogSource(p, wandb_files.read_dir),
              lambda p, first: p.suffix == ".wandb" or (p.suffix == ".jsonl" and (
                  p.name == "wandb-history.jsonl" or '"_step"' in first)),
              lambda p: LogSource(p, wandb_files.read_transaction_log) if p.suffix == ".wandb"
              else _wandb_history(p)),
    LogFormat("mlflow", "an MLflow file store (mlruns/, an experiment or a run)", is_mlflow,
              lambda p: LogSource(p, read_mlflow)),
    LogFormat("tensorboard", "TensorBoard event files (events.out.tfevents.*) or their folder",
              lambda p: bool(event_files(p)), _tensorboard_folder,
              lambda p, _: "tfevents" in p.name,
              lambda p: LogSource(p, lambda f: read_tensorboard([f]))),
    LogFormat("csv", "a CSV (long: step,tag,value; or wide: a step column and one per metric; "
              "k-diffusion's NAME_metrics.csv, a W&B panel export)",
              file=lambda p, _: p.suffix == ".csv", open_file=lambda p: LogSource(p, read_csv),
              suffixes=("_metrics.csv",)),
    LogFormat("jsonl", "JSON lines of {step, tag, value}",
              file=lambda p, _: p.suffix == ".jsonl", open_file=_ldmkit),
)


def formats_text() -> str:
    """The formats, for the CLI's help and the errors."""
    return "; ".join(f.what for f in FORMATS)


def _reads_itself(path: Path) -> bool:
    """A folder a format takes as it is (TensorBoard: event files right in it)."""
    return any(f.folder(path) for f in FORMATS if f.folder and f.name != "tensorboard") or any(
        "tfevents" in p.name and p.is_file() and not p.is_symlink() for p in path.iterdir())


def find_logs(root: Path, depth: int = SEARCH_DEPTH) -> list[Path]:
    """The logs below ``root`` where users point (the project folder a trainer wrote into):
    folders a format reads and the files a format searches for, at most ``depth`` levels down,
    links and hidden folders never entered; newest first."""
    searched = tuple(s for f in FORMATS for s in f.suffixes)
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
        if here != root and _reads_itself(here):
            found.append(here)
            dirnames[:] = []
            continue
        found += [here / f for f in sorted(filenames) if f.endswith(searched)
                  and not (here / f).is_symlink()]
        if len(here.relative_to(root).parts) + 1 >= depth:
            dirnames[:] = []
    return sorted(found, key=last_written, reverse=True)


def _first_line(path: Path) -> str:
    if path.suffix != ".jsonl":
        return ""
    with open_regular(path) as fh:
        return fh.readline(4096).decode("utf-8", errors="replace")


def open_log(path: Path) -> LogSource:
    """The source of ``path``, whichever format it is; UnreadableLog with a one-line reason
    listing the formats when it is none of them. A folder that is not itself a log is searched
    (``find_logs``) and its newest log opened, which the source's reads say."""
    if not path.exists():
        raise UnreadableLog(f"'{path}' does not exist; pass {formats_text()}")
    if path.is_dir():
        for fmt in FORMATS:
            if fmt.folder and fmt.open_folder and fmt.folder(path):
                return fmt.open_folder(path)
        logs = find_logs(path)
        if not logs:
            raise UnreadableLog(f"'{path}' holds no log ldmkit reads (searched {SEARCH_DEPTH} "
                                f"levels down); pass {formats_text()}")
        source = open_log(logs[0])
        others = ", ".join(f"'{log}'" for log in logs[1:])
        source.notes.insert(0, f"'{path}' holds {len(logs)} log{'s' * (len(logs) > 1)}: read "
                               f"the newest, '{logs[0]}'" + (f"; also found {others[:400]}"
                                                             if others else ""))
        return source
    first = _first_line(path)
    for fmt in FORMATS:
        if fmt.file and fmt.open_file and fmt.file(path, first):
            return fmt.open_file(path)
    raise UnreadableLog(f"'{path}': unknown format; pass {formats_text()}")


def read_raw(path: Path) -> RawLog:
    """The records of ``path``, whichever format it is, read once."""
    try:
        source = open_log(path)
    except DAMAGE as exc:
        raise damaged(path, exc) from None
    raw = source.poll()
    assert raw is not None  # a new source has never been read
    return raw
