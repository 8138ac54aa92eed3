"""Run directories: ldmkit's own, one writer at a time, never left through a link.

A run directory is recognised by its owner file (``files.OWNER_FILE`` reading ``run``), or, for
runs made before owner files, by its ``config.yaml``. ldmkit writes only into a directory that
is new, empty or a run: a non-empty directory of the user's is refused before anything is
written. Commands that write into a run (``train``, ``run``, ``sample``, ``eval``, ``encode``)
hold an exclusive OS lock (``flock``) on ``RUN/.lock`` for as long as they run; the kernel
releases it on any exit, SIGKILL included. ``diagnose``, ``report`` and ``watch`` only read and
take no lock, so they work while a run trains.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from ldmkit.errors import CheckpointError, LdmkitError
from ldmkit.files import OWNER_FILE, check_no_links, owner_of, write_text_atomic

CONFIG_FILE = "config.yaml"
RUN_KIND = "run"
LOCK_FILE = ".lock"


class RunBusy(LdmkitError):
    """Another process is writing into the run directory."""


def is_run(path: Path) -> bool:
    """An ldmkit run: its owner file says so, or (older runs) it holds a ``config.yaml``."""
    return owner_of(path) == RUN_KIND or (path.is_dir() and (path / CONFIG_FILE).is_file())


def check_new_run_dir(path: Path) -> None:
    """A fresh run may start in a new or empty directory only, never in a user's."""
    if path.is_symlink() and not path.is_dir():
        raise LdmkitError(f"run_dir '{path}' is a dangling symbolic link; choose another run_dir")
    if path.exists() and not path.is_dir():
        raise LdmkitError(f"run_dir '{path}' is a file; choose a new directory")
    if path.is_dir() and any(path.iterdir()) and not is_run(path):
        raise LdmkitError(f"run_dir '{path}' is a non-empty directory that is not an ldmkit run; "
                          "ldmkit writes runs only into new or empty directories: choose another "
                          "run_dir")
    parent = path.parent if not path.exists() else path
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise LdmkitError(f"run_dir '{path}': '{parent}' is not writable; choose another run_dir")


def claim(path: Path) -> None:
    """Create the run directory (or adopt an older run) and write its owner file."""
    path.mkdir(parents=True, exist_ok=True)
    if owner_of(path) != RUN_KIND:
        write_text_atomic(path / OWNER_FILE, RUN_KIND + "\n")


class RunLock:
    """An exclusive, non-blocking ``flock`` on ``RUN/.lock`` holding the writer's PID."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            raise LdmkitError(f"cannot lock '{self.path}' ({exc.strerror}); the run directory "
                              "must be writable and hold no link named .lock") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunBusy(f"run directory '{self.path.parent}' is in use by another ldmkit "
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


@contextlib.contextmanager
def writing_run(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir`` for writing: no links inside it, no other writer while held."""
    if not is_run(run_dir):
        raise CheckpointError(f"'{run_dir}' is not an ldmkit run directory (no {CONFIG_FILE})")
    check_no_links(run_dir)
    lock = RunLock(run_dir).acquire()
    try:
        yield
    finally:
        lock.release()
