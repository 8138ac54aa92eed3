"""Trainers' own metric files, read without the trainer installed.

- ai-toolkit's ``loss_log.db`` (ostris/ai-toolkit ``toolkit/logging_aitk.py`` ``UILogger``,
  on for jobs made in its web UI): SQLite in WAL mode, tables ``steps(step, wall_time)``,
  ``metric_keys`` and ``metrics(step, key, value_real, value_text)``, one row per key and
  committed step. The trainer writes it while we read, so it is opened read-only; a resumed
  run deletes the rows after its resume step itself (``_prune_future_steps``). SQLite stores
  a NaN as NULL: a row whose value is NULL where the trainer logged a number is read as NaN,
  so a diverged loss stays visible.
- SimpleTuner's local tracker (``report_to: simpletuner``; bghira/SimpleTuner
  ``simpletuner/helpers/training/local_metrics.py`` ``LocalMetricsTracker``):
  ``training_metrics.jsonl``, one ``{"schema_version", "timestamp", "step", "metrics"}`` per
  log call, and the manifest ``training_metrics.json`` whose ``config`` holds the run's main
  settings. Its ``_coerce_scalar`` drops non-finite values, so a NaN loss is absent there.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Any

from ldmkit.platform.files import check_regular, read_json
from ldmkit.vitals.logs.formats import RawLog, Record, UnreadableLog, scalar

AITK_DB = "loss_log.db"
SIMPLETUNER_JSONL, SIMPLETUNER_MANIFEST = "training_metrics.jsonl", "training_metrics.json"
REAL_KEYS = ("loss/", "learning_rate", "val/", "lr")  # keys ai-toolkit logs numbers under


AitkMark = tuple[int, int, float]  # the newest step read, and the steps' count and time sum


def read_aitk(path: Path, after: AitkMark | None = None) -> tuple[RawLog, AitkMark, bool]:
    """``loss_log.db``'s numeric metric rows, NULL read as NaN for the keys that are numbers
    (a NaN bound by Python is stored as NULL), and a mark of what was read. Given the mark of
    an earlier read, only the rows of later steps, unless the steps read then changed (a resumed
    run deletes the rows after its resume step and logs them again, with new wall times): then
    every row. The flag says whether every row was read."""
    check_regular(path)
    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True,
                                                timeout=2.0)) as con:
            since = -1
            if after is not None:
                count, total = con.execute("SELECT COUNT(*), TOTAL(wall_time) FROM steps WHERE "
                                           "step <= ?", (after[0],)).fetchone()
                since = after[0] if (count, total) == after[1:] else -1
            rows = con.execute("SELECT step, key, value_real, value_text FROM metrics WHERE "
                               "step > ? ORDER BY step", (since,)).fetchall()
            newest = max((r[0] for r in rows if isinstance(r[0], int)), default=since)
            mark = (newest, *con.execute("SELECT COUNT(*), TOTAL(wall_time) FROM steps WHERE "
                                         "step <= ?", (newest,)).fetchone())
    except sqlite3.Error as exc:
        raise UnreadableLog(f"'{path}' is not a readable ai-toolkit log ({exc}); pass the "
                            f"job's {AITK_DB}, or wait for the trainer to release it") from None
    records: list[Record] = []
    for step, key, real, text in rows:
        if not isinstance(step, int) or not isinstance(key, str):
            continue
        if real is not None:
            records.append((step, key, float(real)))
        elif text is None and key.startswith(REAL_KEYS):
            records.append((step, key, float("nan")))
    return RawLog(records, "ai-toolkit", str(path)), mark, since < 0


def simpletuner_row(row: Any) -> list[Record]:
    """One ``training_metrics.jsonl`` record's scalars."""
    step, metrics = int(row["step"]), row["metrics"]
    return [(step, str(key), value) for key, raw in metrics.items()
            if (value := scalar(raw)) is not None]


def simpletuner_config(path: Path) -> dict[str, Any]:
    """The ``config`` of the manifest beside ``training_metrics.jsonl`` ({} when absent or
    unreadable: the metrics are read without it)."""
    manifest = path.with_name(SIMPLETUNER_MANIFEST)
    if not manifest.exists():
        return {}
    try:
        data = read_json(manifest)
    except ValueError:
        return {}
    config = data.get("config", {}) if isinstance(data, dict) else {}
    return config if isinstance(config, dict) else {}


def is_simpletuner_line(first_line: str) -> bool:
    return '"metrics"' in first_line and '"schema_version"' in first_line
