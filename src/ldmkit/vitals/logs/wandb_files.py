"""Weights & Biases run folders, read without a W&B account or server.

Older SDKs wrote ``files/wandb-history.jsonl`` (one JSON object per logged step, the step in
``_step``) and ``files/config.yaml`` (``{key: {desc, value}}``). Current SDKs (wandb-core) keep a
run's history only in its transaction log ``run-<id>.wandb``: a 7-byte header (``:W&B``, a
magic number, a version) then LevelDB's log format (32 KiB blocks of records, each a 7-byte
header: CRC, length, type FULL/FIRST/MIDDLE/LAST) whose payloads are protobuf ``Record``
messages. The framing is read here; the messages are decoded with the protobuf classes of the
installed ``wandb`` package (installing wandb is all a user with such runs needs).
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

from ldmkit.platform.files import parse_json, read_file
from ldmkit.vitals.logs.formats import RawLog, Record, UnreadableLog, json_lines, load_yaml, scalar

MAGIC = b":W&B"
FILE_HEADER = 7
BLOCK = 32768
RECORD_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _history_row(row: dict[str, Any]) -> list[Record]:
    step = int(row["_step"])
    return [(step, key, value) for key, raw in row.items()
            if not key.startswith("_") and (value := scalar(raw)) is not None]


def read_history(path: Path, config: dict[str, Any] | None = None) -> RawLog:
    """``wandb-history.jsonl``."""
    return RawLog(json_lines(path, _history_row, "a W&B history row (a JSON object with _step)"),
                  "wandb", str(path), config or {})


def _config_yaml(path: Path) -> dict[str, Any]:
    """``config.yaml``: ``{key: {desc, value}}``; W&B's own ``_wandb`` entry left out."""
    if not path.is_file():
        return {}
    return {k: v.get("value") if isinstance(v, dict) and "value" in v else v
            for k, v in load_yaml(path).items() if not str(k).startswith("_")}


def _payloads(path: Path) -> list[bytes]:
    """The records of a LevelDB-format log; a torn end (a run still writing) ends it."""
    data = read_file(path)
    if data[:4] != MAGIC:
        raise UnreadableLog(f"'{path}' is not a W&B transaction log (no ':W&B' header); pass the "
                            "run folder or an exported CSV")
    payloads, pending, pos = [], b"", FILE_HEADER
    while pos + RECORD_HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < RECORD_HEADER:  # a block's zero-filled trailer
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + RECORD_HEADER])
        if kind == 0 and length == 0:
            pos += left
            continue
        end = pos + RECORD_HEADER + length
        if end > len(data) or kind not in (FULL, FIRST, MIDDLE, LAST):
            if end > len(data):
                break
            raise UnreadableLog(f"'{path}' is damaged at byte {pos} (record type {kind}); "
                                "export the run's history as CSV from the W&B panel")
        chunk = data[pos + RECORD_HEADER:end]
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            payloads.append(pending)
        pos = end
    return payloads


def read_transaction_log(path: Path) -> RawLog:
    """``run-<id>.wandb``: the history rows and the run's config."""
    try:
        from google.protobuf.message import DecodeError
        from wandb.proto import wandb_internal_pb2
    except ImportError:
        raise UnreadableLog(f"'{path}' is a W&B transaction log: `pip install wandb` to read it, "
                            "or export the run's history as CSV from the W&B panel") from None
    records: list[Record] = []
    config: dict[str, Any] = {}
    bad: list[int] = []
    for number, payload in enumerate(_payloads(path), 1):
        message = wandb_internal_pb2.Record()
        try:
            message.ParseFromString(payload)
        except DecodeError:
            raise UnreadableLog(f"'{path}' holds a record that is not W&B's; export the run's "
                                "history as CSV from the W&B panel") from None
        try:
            _read_record(message, records, config)
        except (ValueError, TypeError, OverflowError):  # a value that is not JSON, a bad _step
            bad.append(number)
    config.pop("_wandb", None)
    notes = [f"skipped {len(bad)} W&B record{'s' * (len(bad) > 1)} that do not decode (first: "
             f"record {bad[0]})"] if bad else []
    return RawLog(records, "wandb", str(path), config, notes)


def _read_record(message: Any, records: list[Record], config: dict[str, Any]) -> None:
    """A history row into ``records``, a config update into ``config``; other kinds ignored.
    A row is decoded whole before it is added, so a bad one adds nothing."""
    kind = message.WhichOneof("record_type")
    if kind == "history":
        row = {item.key or "/".join(item.nested_key): parse_json(item.value_json)
               for item in message.history.item}
        row.setdefault("_step", message.history.step.num)
        records += _history_row(row)
    elif kind in ("run", "config"):
        updates = message.run.config.update if kind == "run" else message.config.update
        for item in updates:
            value = parse_json(item.value_json)
            config[item.key or "/".join(item.nested_key)] = \
                value.get("value", value) if isinstance(value, dict) else value


def is_wandb(path: Path) -> bool:
    return (path.name == "wandb" or (path / "files").is_dir() and any(path.glob("*.wandb"))
            or (path / "files" / "wandb-history.jsonl").is_file()
            or (path / "wandb-history.jsonl").is_file()
            or any(p.is_dir() for p in path.glob("*run-*/files")))


def read_dir(path: Path) -> RawLog:
    """A ``wandb/`` folder (its newest run), a run folder or its ``files/``."""
    runs = sorted((p for p in path.iterdir() if p.name.startswith(("run-", "offline-run-"))
                   and p.is_dir() and not p.is_symlink()),
                  key=lambda p: p.name.removeprefix("offline-"))
    if runs:
        path = runs[-1]
    elif path.name == "wandb":
        raise UnreadableLog(f"'{path}' holds no W&B run-* folder")
    files = path / "files" if (path / "files").is_dir() else path
    history = files / "wandb-history.jsonl"
    if history.is_file():
        return read_history(history, _config_yaml(files / "config.yaml"))
    logs = sorted(p for p in path.glob("*.wandb") if p.is_file() and not p.is_symlink())
    if logs:
        return read_transaction_log(logs[-1])
    raise UnreadableLog(f"W&B run '{path}' has neither files/wandb-history.jsonl nor a "
                        "run-*.wandb log; export its history as CSV from the W&B panel")
