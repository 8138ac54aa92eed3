"""Metric sinks: ``metrics.jsonl`` always, TensorBoard event files with the same tags.

One JSON object per value (``{"step", "tag", "value"}``), flushed as written, so a run killed
at any moment leaves every logged value readable by ``ldmkit diagnose`` and by ``jq``. Stage 1
(``vae/*``) and stage 2 get separate TensorBoard runs, so rewinding stage 2 to a checkpoint on
resume (``purge_step``) never hides stage 1's curves.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ldmkit.platform.files import open_append, write_text_atomic
from ldmkit.vitals import tags as vm
from ldmkit.vitals.logs.formats import JsonLines, Record, json_lines

METRICS_FILE = "metrics.jsonl"
FINDINGS_FILE = "findings.jsonl"  # the rules' events (``vitals.monitor``)


def stage_of(tag: str) -> str:
    return "autoencoder" if tag.startswith(vm.VAE_PREFIX) else "diffusion"


def record_of(obj: Any) -> list[Record]:
    """A ``{step, tag, value}`` line as a record; non-finite values are logged as strings."""
    return [(int(obj["step"]), str(obj["tag"]), float(obj["value"]))]


def metrics_reader(path: Path) -> JsonLines[Record]:
    """A reader of a ``metrics.jsonl`` that can be polled as the run writes it (``watch``)."""
    return JsonLines(path, record_of, "a {step, tag, value} JSON object")


def json_objects(path: Path, what: str = "a JSON object") -> list[dict]:
    """The objects of a JSON-lines file of ldmkit's (``findings.jsonl``), by the one policy."""
    def one(obj: Any) -> list[dict]:
        if not isinstance(obj, dict):
            raise TypeError
        return [obj]

    return json_lines(path, one, what)


def rewind_jsonl(path: Path, step: int, stage: str, step_key: str = "step") -> None:
    """Drop ``stage``'s records after ``step`` and a torn last line, atomically (tmp + rename).

    A resumed run repeats exactly the steps after its checkpoint, so their old records would
    otherwise appear twice. A damaged line is an ``UnreadableLog``, found by the preflight
    (``check_readable``) before anything is written.
    """
    if not path.is_file():
        return
    kept = []
    for rec in json_objects(path):
        tag, at = str(rec.get("tag", rec.get("metric", ""))), rec.get(step_key, 0)
        if stage_of(tag) != stage or (isinstance(at, int) and at <= step):
            kept.append(json.dumps(rec))
    write_text_atomic(path, "".join(line + "\n" for line in kept))


class MetricLogger:
    """Append scalars to ``run_dir/metrics.jsonl`` and (optionally) TensorBoard."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.tensorboard = tensorboard and enabled
        self._tb: dict[str, Any] = {}
        self._purge: dict[str, int] = {}  # stage -> purge_step of its next TensorBoard writer
        self._fh = None  # stays None on DDP ranks other than 0: they log nothing
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._fh = open_append(self.path)
        self.observers: list = []  # objects with observe(step, values), e.g. LiveMonitor

    def _writer(self, stage: str) -> Any:
        if not self.tensorboard:
            return None
        if stage not in self._tb:
            from torch.utils.tensorboard import SummaryWriter

            self._tb[stage] = SummaryWriter(str(self.run_dir / "tensorboard" / stage),
                                            purge_step=self._purge.pop(stage, None))
        return self._tb[stage]

    def rewind(self, step: int, stage: str = "diffusion") -> None:
        """Forget ``stage``'s records after ``step`` (a rollback to a checkpoint)."""
        if self._fh is None:
            return
        self._fh.close()
        rewind_jsonl(self.path, step, stage)
        self._fh = open_append(self.path)
        if stage in self._tb:
            self._tb.pop(stage).close()
        self._purge[stage] = step + 1

    def log(self, step: int, values: dict[str, float]) -> None:
        if self._fh is None:
            return
        for tag, value in values.items():
            value = float(value)
            record = {"step": int(step), "tag": tag, "value": value if math.isfinite(value)
                      else str(value)}
            self._fh.write(json.dumps(record) + "\n")
            writer = self._writer(stage_of(tag))
            if writer is not None:
                writer.add_scalar(tag, value, int(step))
        self._fh.flush()
        for observer in self.observers:
            observer.observe(step, values)

    def series_until(self, step: int) -> dict[str, list[tuple[int, float]]]:
        """``{tag: [(step, value), ...]}`` of the records up to ``step`` (priming a monitor)."""
        earlier: dict[str, list[tuple[int, float]]] = {}
        if self.path.is_file():
            for rec in read_metrics(self.path):
                if rec["step"] <= step:
                    earlier.setdefault(rec["tag"], []).append((rec["step"], rec["value"]))
        return earlier

    def log_text(self, step: int, tag: str, text: str) -> None:
        writer = self._writer("diffusion")
        if writer is not None:
            writer.add_text(tag, text, int(step))

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
        for writer in self._tb.values():
            writer.close()

    def __enter__(self) -> MetricLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(path: str | Path) -> list[dict]:
    """The ``{step, tag, value}`` records of a ``metrics.jsonl`` (values as floats)."""
    return [{"step": step, "tag": tag, "value": value}
            for step, tag, value in metrics_reader(Path(path)).poll()]


def check_readable(run_dir: Path) -> None:
    """Before a resume writes anything: the run's logs read by the one policy (a damaged line
    is a one-line error naming it; a torn last line is fine, the rewind drops it)."""
    for name in (METRICS_FILE, FINDINGS_FILE):
        if (run_dir / name).is_file():
            json_objects(run_dir / name)
