"""Metric sinks: ``metrics.jsonl`` always, TensorBoard event files with the same tags.

One JSON object per value (``{"step", "tag", "value"}``), flushed as written, so a run killed
at any moment leaves every logged value readable by ``ldmkit diagnose`` and by ``jq``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


class MetricLogger:
    """Append scalars to ``run_dir/metrics.jsonl`` and (optionally) TensorBoard."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        self._fh = self.path.open("a", encoding="utf-8")
        self._tb: Any = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        self.last: dict[str, tuple[int, float]] = {}
        self.observers: list = []  # objects with observe(step, values), e.g. LiveMonitor

    def log(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            value = float(value)
            record = {"step": int(step), "tag": tag, "value": value if math.isfinite(value)
                      else str(value)}
            self._fh.write(json.dumps(record) + "\n")
            self.last[tag] = (int(step), value)
            if self._tb is not None:
                self._tb.add_scalar(tag, value, int(step))
        self._fh.flush()
        for observer in self.observers:
            observer.observe(step, values)

    def log_text(self, step: int, tag: str, text: str) -> None:
        if self._tb is not None:
            self._tb.add_text(tag, text, int(step))

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> MetricLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(path: str | Path) -> list[dict]:
    """Records of a ``metrics.jsonl``; non-finite values come back as floats."""
    records = []
    with Path(path).open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                rec = json.loads(line)
                rec["value"] = float(rec["value"])
                records.append(rec)
    return records
