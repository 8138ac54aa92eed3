"""Run directories: their layout, ldmkit's own, one writer at a time, never left through a link.

``RunDir`` owns every path of a run (config, metrics, findings, changes, checkpoints, samples of
a step, the held-out set, the fast-path record, reports) and the queries over its checkpoints:
the latest, the newest at or before a step, and moving those after a step into quarantine.
Everything that reads or writes a run asks it for the path, so the layout is written once.

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
import json
import os
from collections.abc import Iterator
from pathlib import Path

from ldmkit.config import Config, load_config
from ldmkit.errors import CheckpointError, LdmkitError
from ldmkit.platform.fastpath import FASTPATH_FILE
from ldmkit.platform.files import (
    OWNER_FILE,
    check_plain_tree,
    open_append,
    owner_of,
    read_json,
    write_text_atomic,
)
from ldmkit.platform.lock import DirLock
from ldmkit.run.checkpoint import list_checkpoints, step_dir_name, step_of
from ldmkit.vitals.logs.metrics_jsonl import FINDINGS_FILE, METRICS_FILE, json_objects

CONFIG_FILE = "config.yaml"
RUN_KIND = "run"
CHANGES_FILE = "changes.jsonl"  # what each --resume --set changed, at which step
# who applied a remedy, in changes.jsonl: the command, the job's repair (vitals.on_*: repair,
# during training or by restarting it) and the divergence guard's rollback
FIX, REPAIR, ROLLBACK = "ldmkit fix", "vitals repair", "vitals rollback"
CLASSES_FILE = "classes.json"  # a folder dataset's class names, label by label
PROMPTS_FILE = "prompts.json"  # a text-conditional run's grid prompts (conditioning/sources.py)
VAL_FILE = "validation.safetensors"  # the held-out points (training/held_out.py)
SPLIT_FILE = "split.json"  # which images the run holds out, for its life (training/held_out.py)
AE_DIR = "autoencoder"  # stage 1: weights, meta.json, reconstructions.png
CHECKPOINTS_DIR = "checkpoints"
QUARANTINE_DIR = "diverged"  # checkpoints saved after a divergence began, under checkpoints/
SAMPLES_DIR = "samples"
FINAL_SAMPLES = "final"
REPORT_MD, REPORT_HTML = "report.md", "report.html"
TENSORBOARD_DIR = "tensorboard"  # written by vitals.logs.metrics_jsonl.MetricLogger
LATENT_CACHE_DIR = "latents"  # data.latent_cache: auto
PROBE_KIND = "probe"  # a probe directory's owner (ldmkit probe): no config.yaml, no checkpoints
PROBE_FILE = "probe.json"  # what was probed, how, and each checkpoint measured (probe/run.py)
PROBE_DRAWS = "probe.safetensors"  # the probe's fixed draws (probe/measure.py)


class RunDir:
    """The paths of one run directory and the queries over its checkpoints."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def config(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def findings(self) -> Path:
        return self.path / FINDINGS_FILE

    @property
    def changes(self) -> Path:
        return self.path / CHANGES_FILE

    def log_change(self, record: dict) -> None:
        """Append what changed mid-run (a resume's ``--set``, ``ldmkit fix``, a repair or a
        rollback during training) to ``changes.jsonl``: the one writer of that file."""
        with open_append(self.changes) as fh:
            fh.write(json.dumps(record) + "\n")

    def rewind_changes(self, step: int) -> None:
        """Drop the changes made during training (``live``) after ``step``: a resume from
        there makes them again."""
        kept = [record for record in self.change_records()
                if not (record.get("live") and isinstance(record.get("at_step"), int)
                        and record["at_step"] > step)]
        if self.changes.is_file():
            write_text_atomic(self.changes, "".join(json.dumps(r) + "\n" for r in kept))

    def change_records(self) -> list[dict]:
        """The records of ``changes.jsonl`` (none when there is no such file)."""
        return list(json_objects(self.changes)) if self.changes.is_file() else []

    @property
    def classes_file(self) -> Path:
        return self.path / CLASSES_FILE

    @property
    def prompts_file(self) -> Path:
        return self.path / PROMPTS_FILE

    @property
    def probe_file(self) -> Path:
        return self.path / PROBE_FILE

    @property
    def probe_draws(self) -> Path:
        return self.path / PROBE_DRAWS

    def probe_settings(self) -> dict | None:
        """A probe directory's ``probe.json``, or None when ``path`` is not a probe; a damaged
        one is a one-line CheckpointError."""
        if owner_of(self.path) != PROBE_KIND or not self.probe_file.is_file():
            return None
        try:
            settings = read_json(self.probe_file)
        except (OSError, ValueError):
            settings = None
        if not isinstance(settings, dict):
            raise CheckpointError(f"'{self.probe_file}' is damaged; probe again into a new "
                                  "--out directory")
        return settings

    @property
    def validation(self) -> Path:
        return self.path / VAL_FILE

    @property
    def split_file(self) -> Path:
        return self.path / SPLIT_FILE

    @property
    def fastpath(self) -> Path:
        return self.path / FASTPATH_FILE

    @property
    def autoencoder(self) -> Path:
        return self.path / AE_DIR

    @property
    def latent_cache(self) -> Path:
        return self.path / LATENT_CACHE_DIR

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD_DIR

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    @property
    def report_md(self) -> Path:
        return self.path / REPORT_MD

    @property
    def report_html(self) -> Path:
        return self.path / REPORT_HTML

    @property
    def samples_root(self) -> Path:
        return self.path / SAMPLES_DIR

    def samples(self, step: int | None) -> Path:
        """Where the samples of a training step go (``step_0000100``); None: the final ones."""
        return self.samples_root / (FINAL_SAMPLES if step is None else step_dir_name(step))

    def files(self) -> list[Path]:
        """Every file the run holds, links not followed, sorted: what a check of the whole run
        (a fuzz test, a copy) goes through, a file added tomorrow included."""
        found = []
        for dirpath, dirnames, filenames in os.walk(self.path, followlinks=False):
            dirnames.sort()
            found += [Path(dirpath) / name for name in filenames]
        return sorted(found)

    def all_checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        return list_checkpoints(self.checkpoints)

    def latest_checkpoint(self) -> Path:
        ckpts = self.all_checkpoints()
        if not ckpts:
            raise CheckpointError(f"no checkpoint in '{self.checkpoints}'; train first with "
                                  "`ldmkit train CONFIG` or point at another run directory")
        return ckpts[-1]

    def latest_checkpoint_or_none(self) -> Path | None:
        ckpts = self.all_checkpoints()
        return ckpts[-1] if ckpts else None

    def checkpoint_at_most(self, step: int) -> Path | None:
        """The newest checkpoint saved at or before ``step`` (a healthy one to go back to)."""
        kept = [c for c in self.all_checkpoints() if step_of(c) <= step]
        return kept[-1] if kept else None

    def quarantine_after(self, step: int) -> None:
        """Move checkpoints newer than ``step`` to ``checkpoints/diverged/`` (never deleted)."""
        for ckpt in self.all_checkpoints():
            if step_of(ckpt) <= step:
                continue
            target = self.checkpoints / QUARANTINE_DIR / ckpt.name
            target.parent.mkdir(exist_ok=True)
            suffix = 1
            while target.exists():
                target, suffix = self.checkpoints / QUARANTINE_DIR / f"{ckpt.name}.{suffix}", \
                    suffix + 1
            ckpt.rename(target)

    def load_config(self, overrides: list[str] | None = None) -> Config:
        """The resolved config the run was started with, plus ``--set`` overrides."""
        if not self.config.is_file():
            raise CheckpointError(f"'{self.path}' is not an ldmkit run directory (no "
                                  f"{CONFIG_FILE})")
        return load_config(self.config, overrides, saved=True)

    def classes(self, num_classes: int | None = None) -> list[str] | None:
        """The class names the run's labels stand for (folder datasets), or None when it has
        none. A file that does not hold ``num_classes`` names is damaged (it would put the
        wrong name on every class): a one-line CheckpointError."""
        names = _strings(self.classes_file)
        if names is None:
            return None
        if not isinstance(names, list) or (num_classes is not None and len(names) != num_classes):
            count = f"{len(names)} names" if isinstance(names, list) else "no list of names"
            raise CheckpointError(f"'{self.classes_file}' is damaged ({count} for a model of "
                                  f"{num_classes} classes); restore it, or remove it to name "
                                  "classes by index")
        return names

    def prompts(self) -> list[str] | None:
        """The prompts of a text-conditional run's grids, or None when it has none; a damaged
        file is a one-line CheckpointError."""
        prompts = _strings(self.prompts_file)
        if prompts is not None and not prompts:
            raise CheckpointError(f"'{self.prompts_file}' is damaged (not a list of prompts); "
                                  "restore it, or remove it and sample with --prompt")
        return prompts


def _strings(path: Path) -> list[str] | bool | None:
    """A JSON list of strings: None when the file is absent, False when it holds no such
    list (or is unreadable)."""
    if not path.exists():
        return None
    try:
        value = read_json(path)
    except (OSError, ValueError):
        return False
    return value if isinstance(value, list) and all(isinstance(v, str) for v in value) \
        else False


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


def claim(path: Path, kind: str = RUN_KIND) -> None:
    """Create the run (or probe) directory, or adopt an older run, and write its owner file."""
    path.mkdir(parents=True, exist_ok=True)
    if owner_of(path) != kind:
        write_text_atomic(path / OWNER_FILE, kind + "\n")


class RunLock(DirLock):
    """The run directory's writer lock (``platform.lock``)."""

    def __init__(self, run_dir: Path):
        super().__init__(run_dir, "run directory")


@contextlib.contextmanager
def writing_run(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir`` for writing: no links inside it, no other writer while held."""
    if not is_run(run_dir):
        raise CheckpointError(f"'{run_dir}' is not an ldmkit run directory (no {CONFIG_FILE})")
    check_plain_tree(run_dir)
    lock = RunLock(run_dir).acquire()
    try:
        yield
    finally:
        lock.release()
