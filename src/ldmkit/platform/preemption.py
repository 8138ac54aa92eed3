"""Preemption: SIGTERM and SIGINT ask the trainer to stop after the current step.

Clusters (SLURM, Kubernetes, spot instances) send SIGTERM some seconds before a kill; a user
presses Ctrl-C. Either way the step in flight finishes, a checkpoint is written, and the process
exits 0 with the command that resumes. A second Ctrl-C interrupts at once, as users expect.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """A flag set by SIGTERM/SIGINT while installed (a context manager; main thread only)."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class Preempted(Exception):  # noqa: N818 - a request, not a failure
    """Raised where a stage cannot checkpoint mid-way (stage 1): it restarts on resume."""

    def __init__(self, stage: str, step: int, signal_name: str):
        super().__init__(f"{signal_name} during {stage} training at step {step}")
        self.stage, self.step, self.signal_name = stage, step, signal_name
