"""Starting a training command: validate everything, then claim the run directory.

Nothing is written before the config, the device, the data, the checkpoint to resume and the
directories the run would replace have all been checked, so a command refused for bad input
leaves the run (or the directory it named) exactly as it was and can be rerun as soon as the
input is fixed. Then rank 0 creates the directory, takes its lock (``run.layout.RunLock``) for the
whole command and writes ``config.yaml``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from ldmkit.conditioning.sources import ConditionSource, source_of, training_prompts
from ldmkit.config import Config, to_yaml
from ldmkit.data.latents import (
    LazyData,
    cache_dir,
    check_stage1_paths,
    data_needed,
    frozen_encoder,
)
from ldmkit.data.stage1 import LatentPosteriors, is_autoencoder_dir, load_autoencoder
from ldmkit.errors import ConfigError, LdmkitError
from ldmkit.platform.distributed import SINGLE, Dist, barrier, broadcast_text
from ldmkit.platform.files import write_text_atomic
from ldmkit.run.context import check_thresholds
from ldmkit.run.layout import RunDir, RunLock, claim
from ldmkit.training.resume import OpenedRun, check_checkpoint, open_run, record_changes
from ldmkit.vitals.logs.metrics_jsonl import check_readable


def resolve_device(name: str, d: Dist = SINGLE) -> torch.device:
    """``auto``: this process's GPU when there is one (``cuda:LOCAL_RANK`` under torchrun)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' but this torch ({torch.__version__}) sees no CUDA GPU; "
                          "set device: auto or cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device 'mps' but no Apple GPU is available; set device: auto or cpu")
    if name == "cuda" and d.active:
        return torch.device("cuda", d.local_rank)
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None \
            and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device '{name}' but only {torch.cuda.device_count()} GPU(s) are "
                          "visible; set device: auto")
    return device


def preflight(opened: OpenedRun, data: LazyData) -> None:
    """Every check that can fail on input, with nothing written yet."""
    cfg, run_dir = opened.cfg, opened.run_dir
    resolve_device(cfg.device)
    check_thresholds(cfg)
    check_stage1_paths(cfg, run_dir, cache_dir(cfg, run_dir))
    frozen_encoder(cfg)  # a frozen text encoder's directory, tokenizer and transformers
    if cfg.autoencoder.pretrained and not is_autoencoder_dir(RunDir(run_dir).autoencoder):
        load_autoencoder(cfg.autoencoder.pretrained)
    if opened.ckpt is not None:
        check_checkpoint(cfg, run_dir, opened.ckpt)
    if opened.continuing:
        check_readable(run_dir)  # the rewind rewrites the logs: a damaged line fails here
    if data_needed(cfg, run_dir):
        data.get()  # a missing, empty or unreadable dataset fails here


def _agree(error: str, d: Dist) -> None:
    """Rank 0's verdict on every rank, so all of them stop on its error."""
    error = broadcast_text(error, d)
    if error:
        raise LdmkitError(error)


@contextlib.contextmanager
def start_run(cfg: Config, run_dir: Path | None, resume: bool, data: LazyData,
              d: Dist = SINGLE) -> Iterator[OpenedRun]:
    """The validated run, its directory claimed and locked by rank 0 while the block runs."""
    error, opened = "", None
    try:
        opened = open_run(cfg, run_dir and Path(run_dir), resume)
        if d.is_main:
            preflight(opened, data)
    except LdmkitError as exc:
        if not d.active:
            raise
        error = str(exc)
    _agree(error, d)
    assert opened is not None
    opened.run_dir = Path(broadcast_text(str(opened.run_dir), d))
    lock = None
    if d.is_main:
        fresh = not opened.continuing
        claim(opened.run_dir)
        lock = RunLock(opened.run_dir).acquire()
        if fresh and RunDir(opened.run_dir).config.exists():
            lock.release()
            raise LdmkitError(f"run_dir '{opened.run_dir}' was just started by another process; "
                              "choose another run_dir")
        if fresh:
            write_text_atomic(RunDir(opened.run_dir).config, to_yaml(opened.cfg))
        record_changes(opened)
        print(f"run directory: {opened.run_dir}\n--- config ---\n{to_yaml(opened.cfg)}"
              "--------------")
        if d.active:
            print(f"distributed: {d.world} processes, global batch {opened.cfg.train.batch_size}")
    barrier(d)
    try:
        yield opened
    finally:
        if lock is not None:
            lock.release()


def run_source(cfg: Config, run_dir: Path, latents: LatentPosteriors, train_rows: torch.Tensor,
               d: Dist = SINGLE) -> ConditionSource:
    """The run's condition source (conditioning/sources.py). A text-conditional run's grid
    prompts (``sample.prompts``, then captions of its training images) are the same on every
    rank; rank 0 writes them to ``RUN/prompts.json``, where ``ldmkit sample`` and the findings
    that name a prompt read them."""
    prompts = None
    if cfg.model.text_encoder and latents.captions is not None:
        prompts = training_prompts(cfg.sample.prompts, latents.captions, train_rows)
        if d.is_main:
            write_text_atomic(RunDir(run_dir).prompts_file, json.dumps(prompts, indent=1))
    return source_of(cfg, latents, prompts=prompts)
