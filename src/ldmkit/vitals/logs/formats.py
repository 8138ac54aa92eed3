"""Read the files other trainers log to into ``(step, tag, value)`` records and their run config.

Each reader returns a ``RawLog``: the records with the tags exactly as written, the
hyperparameters the run saved beside them (flattened; {} when none), and which format it was.
Which trainer wrote the tags, and what they mean, is ``ldmkit.vitals.logs.trainers``' business.

Formats: ldmkit's ``metrics.jsonl``; CSV, long (``step,tag,value``, the name column also called
``key``, ``metric`` or ``name``) or wide (a step column and
one column per metric: k-diffusion's ``*_metrics.csv``, W&B's panel export); TensorBoard event
files (accelerate's tracker writes the run's ``hparams.yml`` beside them); an MLflow file store
(``mlruns/<experiment>/<run>/metrics/<key>``, lines ``timestamp value step``). Weights & Biases
runs: ``ldmkit.vitals.logs.wandb_files``; which reader a path needs: ``ldmkit.vitals.logs.readers``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import yaml

try:
    import tomllib
except ImportError:  # Python 3.10: a copied TOML config is not read
    tomllib = None  # type: ignore[assignment]

from ldmkit.errors import LdmkitError
from ldmkit.platform.files import (
    check_regular,
    open_regular,
    parse_json,
    parse_yaml,
    read_file,
    read_file_text,
)

Record = tuple[int, str, float]
T = TypeVar("T")


class UnreadableLog(LdmkitError):
    """A metrics source is missing, malformed or empty."""


@dataclass
class RawLog:
    records: list[Record]
    fmt: str
    source: str
    config: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what was read only in part, and why


def scalar(value: Any) -> float | None:
    """A logged scalar as float; None for what is not one (images, tables, text, booleans)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        return float(value)
    except (ValueError, OverflowError):
        return None


class JsonLines(Generic[T]):
    """The one reader of JSON-lines logs (ldmkit's ``metrics.jsonl`` and ``findings.jsonl``,
    W&B's history), read whole or followed as they grow.

    The policy for a live or killed writer: a last line that does not parse is torn (being
    written, or its writer was killed mid-line) and is left for the next ``poll``; a line that
    does not parse with lines after it is damaged, an ``UnreadableLog`` naming its number.
    A JSON object is unparseable until its closing brace, so a half-written record is never
    taken for a whole one.
    """

    def __init__(self, path: Path, parse: Callable[[Any], list[T]], what: str):
        self.path, self.parse, self.what = path, parse, what
        self.offset, self.lines_read = 0, 0

    def poll(self) -> list[T]:
        """The records of the lines added since the last call (all of them on the first)."""
        with open_regular(self.path) as fh:
            fh.seek(self.offset)
            chunk = fh.read()
        lines = chunk.split(b"\n")
        out: list[T] = []
        for index, raw in enumerate(lines):
            last = index == len(lines) - 1
            text = raw.decode("utf-8", errors="replace")
            if text.strip():
                try:
                    out += self.parse(parse_json(text))
                except (json.JSONDecodeError, KeyError, TypeError, ValueError, OverflowError,
                        AttributeError):
                    if last or (index == len(lines) - 2 and not lines[-1].strip()):
                        break  # torn: read again on the next poll
                    raise UnreadableLog(f"'{self.path}' line {self.lines_read + 1} is not "
                                        f"{self.what}; fix or delete that line") from None
            self.offset += len(raw) + (0 if last else 1)
            self.lines_read += 0 if last else 1
        return out


def json_lines(path: Path, parse: Callable[[Any], list[T]], what: str) -> list[T]:
    """Every record of a JSON-lines file, by ``JsonLines``' policy."""
    return JsonLines(path, parse, what).poll()


MAX_YAML_BYTES = 16 << 20  # a run's saved hyperparameters are kilobytes
MAX_YAML_VALUES = 100_000  # hundreds of keys in the largest trainers' configs


def load_yaml(path: Path) -> dict[str, Any]:
    """A run's saved hyperparameters (``hparams.yml``, W&B's ``config.yaml``, MLflow's
    ``meta.yaml``), bounded in size and in what its aliases expand to."""
    if path.stat().st_size > MAX_YAML_BYTES:
        raise UnreadableLog(f"'{path}' is larger than {MAX_YAML_BYTES >> 20} MiB, not a run's "
                            "saved settings; move it away")
    try:
        data = parse_yaml(read_file_text(path), MAX_YAML_VALUES)
    except yaml.YAMLError as exc:
        raise UnreadableLog(f"'{path}' is not readable YAML ({str(exc).splitlines()[0]}); "
                            "repair or remove it") from None
    return data if isinstance(data, dict) else {}


def load_toml(path: Path) -> dict[str, Any]:
    """A TOML config copied beside a run's logs (diffusion-pipe's ``train.py`` copies its
    config and dataset files into the run directory), its tables flattened to dotted keys
    (``model.shift``), lists left out; on Python 3.10 (no ``tomllib``), nothing."""
    if tomllib is None:
        return {}
    if path.stat().st_size > MAX_YAML_BYTES:
        raise UnreadableLog(f"'{path}' is larger than {MAX_YAML_BYTES >> 20} MiB, not a run's "
                            "saved settings; move it away")
    try:
        data = tomllib.loads(read_file_text(path))
    except (tomllib.TOMLDecodeError, RecursionError) as exc:
        raise UnreadableLog(f"'{path}' is not readable TOML ({str(exc).splitlines()[0][:120]}); "
                            "repair or remove it") from None
    flat: dict[str, Any] = {}
    tables: list[tuple[str, dict[str, Any]]] = [("", data)]
    while tables:
        prefix, table = tables.pop()
        for key, value in table.items():
            if isinstance(value, dict):
                tables.append((f"{prefix}{key}.", value))
            elif not isinstance(value, list):
                flat[f"{prefix}{key}"] = value
    return flat


def read_csv(path: Path) -> RawLog:
    """Long (``step,tag,value``) or wide (a ``step``/``Step``/``_step`` column, one per metric).

    W&B's panel export names columns ``<run> - <metric>`` with ``__MIN``/``__MAX`` companions
    (the range of a smoothed plot): the run prefix is dropped and the companions are skipped.
    """
    try:
        rows = list(csv.reader(io.StringIO(read_file_text(path).removeprefix("\ufeff"),
                                           newline="")))
    except csv.Error as exc:
        raise UnreadableLog(f"'{path}' is not a readable CSV ({exc}); export step,tag,value "
                            "rows or a step column with one column per metric") from None
    if not rows:
        raise UnreadableLog(f"CSV '{path}' is empty")
    header = [c.strip() for c in rows[0]]
    names = next((n for n in LONG_TAG_COLUMNS if {"step", n, "value"} <= set(header)), None)
    if names is not None:
        return RawLog(_long_rows(path, header, rows[1:], names), "csv", str(path))
    steps = [i for i, c in enumerate(header) if c.lower() in ("step", "_step", "global_step")]
    if not steps:
        raise UnreadableLog(f"CSV '{path}' has columns {header[:6]}; it needs step,tag,value or "
                            "a step column")
    columns = {i: c.split(" - ", 1)[-1] for i, c in enumerate(header)
               if i != steps[0] and c and not c.endswith(("__MIN", "__MAX"))}
    records = []
    for number, row in enumerate(rows[1:], 2):
        if not any(cell.strip() for cell in row):
            continue
        step = scalar(row[steps[0]]) if len(row) > steps[0] else None
        if step is None or not math.isfinite(step):
            if number == len(rows):  # a torn last line
                break
            raise UnreadableLog(f"CSV '{path}' line {number} has no step; fix or delete that line")
        for i, name in columns.items():
            if i < len(row) and row[i].strip() and (value := scalar(row[i])) is not None:
                records.append((int(step), name, value))
    return RawLog(records, "csv-wide", str(path))


# long format: a step, a name and a value per row; DiffSynth-Studio's loss.csv names it "key"
LONG_TAG_COLUMNS = ("tag", "key", "metric", "name")


def _long_rows(path: Path, header: list[str], rows: list[list[str]], names: str
               ) -> list[Record]:
    index = {"step": header.index("step"), "tag": header.index(names),
             "value": header.index("value")}
    records = []
    for number, row in enumerate(rows, 2):
        if not any(cell.strip() for cell in row):
            continue
        try:
            records.append((int(float(row[index["step"]])), row[index["tag"]].strip(),
                            float(row[index["value"]])))
        except (IndexError, ValueError, OverflowError):
            if number == len(rows) + 1:
                break
            raise UnreadableLog(f"CSV '{path}' line {number} has a bad step or value; "
                                "fix or delete that line") from None
    return records


def event_files(path: Path) -> list[Path]:
    """The event files below ``path`` (links left out); NotRegular for one that is a FIFO or
    a device, which TensorBoard, reading the whole directory, would block on."""
    found = [p for p in path.rglob("*") if "tfevents" in p.name and not p.is_symlink()
             and not p.is_dir()]
    for file in found:
        check_regular(file)
    return sorted(found)


def damaged_at(path: Path) -> int | None:
    """The byte offset of the first record of a TensorBoard event file that fails its CRC with
    more of the file after it, or None. TensorBoard's reader stops there without a word, so the
    rest of the log would be silently missing; a torn last record (a live or killed writer) is
    not damage. Records are TFRecords: length (8 bytes), its masked CRC-32C, data, its CRC."""
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    data, pos = read_file(path), 0
    while pos + 12 <= len(data):
        (length,), (length_crc,) = struct.unpack_from("<Q", data, pos), \
            struct.unpack_from("<I", data, pos + 8)
        end = pos + 12 + length + 4
        if masked_crc32c(data[pos:pos + 8]) != length_crc:
            return pos
        if end > len(data):
            return None  # torn at the end
        (data_crc,) = struct.unpack_from("<I", data, end - 4)
        if masked_crc32c(data[pos + 12:end - 4]) != data_crc:
            return pos if end < len(data) else None
        pos = end
    return None


MAX_DIRECTORY_FILES = 64  # TensorBoard lists a directory once per file it opens: O(files^2)


def _accumulator_sources(files: list[Path], written: list[Path]) -> list[Path]:
    """What to hand TensorBoard's accumulator: each directory (it purges restarted steps across
    its files), or, for a directory of more than MAX_DIRECTORY_FILES event files, each of
    its non-empty files (5,000 files read as a directory took 85 s)."""
    if len(files) == 1:
        return written
    crowded = {d for d in {f.parent for f in files}
               if sum(f.parent == d for f in files) > MAX_DIRECTORY_FILES}
    return sorted({f.parent for f in written if f.parent not in crowded}) + \
        [f for f in written if f.parent in crowded]


def read_tensorboard(files: list[Path], root: Path | None = None) -> RawLog:
    """One accumulator per directory, so restarts purged with ``purge_step`` read as TensorBoard
    shows them (no duplicated steps); a single file is read alone. accelerate's tracker saves
    the run's hyperparameters as ``hparams.yml`` under the log directory: they become the
    config."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for file in files:
        check_regular(file)
    written = [f for f in files if f.stat().st_size > 0]
    if not written:
        raise UnreadableLog(f"'{root or files[0]}' holds {len(files)} TensorBoard event "
                            f"file{'s' * (len(files) > 1)}, all empty: the run logged nothing")
    records = []
    for file in _accumulator_sources(files, written):
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
    config: dict[str, Any] = {}
    for hparams in sorted((root or files[0].parent).rglob("hparams.yml")):
        config.update(load_yaml(hparams))
    for folder in sorted({file.parent for file in files}):  # beside the event files
        for copied in sorted(folder.glob("*.toml")):
            if copied.is_file() and not copied.is_symlink():
                config.update(load_toml(copied))
    notes = [f"'{file}' is damaged at byte {at} of {file.stat().st_size} (a record fails its "
             "checksum): read up to there, the rest of that file is not read"
             for file in written if (at := damaged_at(file)) is not None]
    return RawLog(records, "tensorboard", str(root or files[0]), config, notes)


def _mlflow_runs(path: Path) -> list[Path]:
    if (path / "metrics").is_dir():
        return [path]
    runs = [p.parent for p in path.glob("*/metrics") if p.is_dir()]
    runs += [p.parent for p in path.glob("*/*/metrics") if p.is_dir()]
    return [r for r in runs if (r / "meta.yaml").is_file() and not r.is_symlink()]


def is_mlflow(path: Path) -> bool:
    return bool(_mlflow_runs(path))


def _start_time(run: Path) -> float:
    """A run's ``start_time`` (milliseconds), 0 when it is missing or not a number."""
    value = scalar(load_yaml(run / "meta.yaml").get("start_time"))
    return value if value is not None and math.isfinite(value) else 0.0


def read_mlflow(path: Path) -> RawLog:
    """MLflow's file store: ``mlruns/``, one experiment or one run; the newest run is read."""
    runs = _mlflow_runs(path)
    if not runs:
        raise UnreadableLog(f"'{path}' holds no MLflow run (a folder with meta.yaml and metrics/)")
    run = max(runs, key=lambda r: (_start_time(r), r.name))
    records = []
    for file in sorted(p for p in (run / "metrics").rglob("*") if p.is_file()):
        key = file.relative_to(run / "metrics").as_posix()
        lines = read_file_text(file).splitlines()
        for number, line in enumerate(lines, 1):
            parts = line.split()
            value = scalar(parts[1]) if len(parts) >= 2 else None
            step = scalar(parts[2]) if len(parts) >= 3 else 0.0
            if value is None or step is None or not math.isfinite(step):
                if number == len(lines):
                    break
                raise UnreadableLog(f"MLflow metric file '{file}' line {number} is not "
                                    "'timestamp value step'; fix or delete that line")
            records.append((int(step), key, value))
    params = run / "params"
    config = {p.relative_to(params).as_posix(): read_file_text(p)
              for p in sorted(params.rglob("*")) if p.is_file()} if params.is_dir() else {}
    return RawLog(records, "mlflow", str(run), config)
