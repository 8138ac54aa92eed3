"""One writer per directory: an exclusive, non-blocking OS lock (``flock``) on ``DIR/.lock``.

Every process that writes a run's logs takes it: ``ldmkit train``, ``sample``, ``eval`` and
``encode`` (through ``run.layout.writing_run``) and the training-loop hooks
(``vitals.observer.VitalsMonitor``, ``integrations.accelerate.AccelerateVitals``) on their log
directory, so two writers never interleave records in one ``metrics.jsonl``. The kernel
releases the lock on any exit, SIGKILL included; readers (``diagnose``, ``report``, ``watch``)
take none.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

from ldmkit.errors import LdmkitError

LOCK_FILE = ".lock"


class DirBusy(LdmkitError):
    """Another process is writing into the directory."""


class DirLock:
    """The lock on ``directory/.lock``, holding the writer's PID for the refusal message."""

    def __init__(self, directory: Path, what: str = "directory"):
        self.path, self.what = Path(directory) / LOCK_FILE, what
        self._fd: int | None = None

    def acquire(self) -> DirLock:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except OSError as exc:
            raise LdmkitError(f"cannot lock '{self.path}' ({exc.strerror}); the {self.what} "
                              "must be writable and hold no link named .lock") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DirBusy(f"{self.what} '{self.path.parent}' is in use by another ldmkit "
                          f"process (PID {holder}); wait for it to finish or stop it, then retry "
                          "(diagnose, report and watch work meanwhile)") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock
            self._fd = None

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, exc_type: type | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
