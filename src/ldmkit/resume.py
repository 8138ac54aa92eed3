"""What a stage-2 checkpoint holds, and how a run directory is started, continued and rewound.

Resume is exact (bitwise on CPU): the model, EMA, optimizer, the training generator and torch's
global RNG, the data position, the partial log interval and the counters are restored, and the
logs are rewound to the checkpoint's step, so the steps that are run again are recorded once and
with the same values an uninterrupted run would have logged.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from ldmkit.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    optimizer_from_flat,
    optimizer_to_flat,
    save_checkpoint,
    split_prefix,
    with_prefix,
)
from ldmkit.config import Config, from_dict, load_config, to_dict
from ldmkit.data import BatchOrder
from ldmkit.errors import CheckpointError
from ldmkit.files import check_no_links, open_append
from ldmkit.logging import rewind_jsonl
from ldmkit.models.autoencoder import Autoencoder
from ldmkit.models.registry import backbone_spec, build_backbone
from ldmkit.optim import EMA
from ldmkit.rundir import CONFIG_FILE, check_new_run_dir, is_run
from ldmkit.stage1 import AE_DIR, load_autoencoder
from ldmkit.untrusted import brief
from ldmkit.vitals.monitor import FINDINGS_FILE
from ldmkit.vitals.signs import StepAccumulator

CHANGES_FILE = "changes.jsonl"
# what rerunning the same command may change: the run's length
CONTINUABLE = ("train.steps",)
# what --resume may not change, and why; the rest (train.*, diffusion.*, sample.*, vitals.*,
# device, ...) alters the run from the checkpoint on, as the findings' fixes advise (a lower
# train.lr, another latent_scale_factor or t_sampling), and is recorded in RUN/changes.jsonl
FIXED_ON_RESUME = (
    ("data", "the latent cache, the data order and the checkpoint's data position belong to "
             "this dataset"),
    ("autoencoder", "stage 1 is trained and the latents are encoded with it"),
    ("model", "the checkpoint holds this architecture's weights"),
    ("seed", "the data order and noise of the run follow from it"),
    ("diffusion.objective", "the checkpoint's network predicts this objective's target"),
    ("diffusion.schedule", "the checkpoint's network learned this noise path"),
)


@dataclass
class LoopState:
    """Everything the training loop mutates; a checkpoint saves and restores all of it."""

    model: nn.Module
    ema: EMA
    opt: torch.optim.Optimizer
    gen: torch.Generator
    order: BatchOrder
    acc: StepAccumulator
    backbone: dict  # models/registry.py spec of ``model``
    step: int = 0
    nonfinite: int = 0
    rollbacks: int = 0
    lr_scale: float = 1.0
    sick_since: int | None = None  # first step of the current run of abnormal steps (divergence)


def save_state(run_dir: Path, cfg: Config, state: LoopState) -> Path:
    optim_tensors, optim_meta = optimizer_to_flat(state.opt)
    sums, count = state.acc.state()
    weights = {**with_prefix(state.model.state_dict(), "model."),
               **with_prefix(state.ema.model.state_dict(), "ema.")}
    training = {**optim_tensors, **with_prefix(sums, "acc."),
                "rng.train": state.gen.get_state(), "rng.torch": torch.get_rng_state()}
    meta = {"config": to_dict(cfg), "backbone": state.backbone,
            "latent_scale_factor": cfg.diffusion.latent_scale_factor, "optimizer": optim_meta,
            "data_order": state.order.state(),
            "ema_updates": state.ema.updates, "nonfinite_steps": state.nonfinite,
            "rollbacks": state.rollbacks, "lr_scale": state.lr_scale, "acc_count": count,
            "sick_since": state.sick_since}
    return save_checkpoint(run_dir / "checkpoints", state.step, weights, training, meta,
                           cfg.train.checkpoint_keep)


def restore_state(path: Path, state: LoopState) -> None:
    weights, training, meta = load_checkpoint(path)
    try:
        state.model.load_state_dict(split_prefix(weights, "model."))
        state.ema.model.load_state_dict(split_prefix(weights, "ema."))
        optimizer_from_flat(state.opt, training, meta["optimizer"])
        state.gen.set_state(training["rng.train"])
        torch.set_rng_state(training["rng.torch"])
        state.order.load(meta["data_order"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise CheckpointError(f"checkpoint '{path}' does not match this config's model "
                              f"({str(exc).splitlines()[0]}); resume with the run's own config") from None
    state.ema.updates = meta["ema_updates"]
    state.acc.load(split_prefix(training, "acc."), meta.get("acc_count", 0))
    state.step, state.nonfinite = meta["step"], meta["nonfinite_steps"]
    state.rollbacks, state.lr_scale = meta.get("rollbacks", 0), meta.get("lr_scale", 1.0)
    state.sick_since = meta.get("sick_since")


def rewind_findings(run_dir: Path, step: int) -> None:
    rewind_jsonl(run_dir / FINDINGS_FILE, step, "diffusion", step_key="at_step")


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(a) | set(b)):
        name = prefix + key
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            keys += _differences(a[key], b[key], name + ".")
        elif a.get(key) != b.get(key) and name != "run_dir":
            keys.append(name)
    return keys


def _fixed_on_resume(key: str) -> str | None:
    """Why ``key`` cannot change when a run continues, or None when it may."""
    for prefix, why in FIXED_ON_RESUME:
        if key == prefix or key.startswith(prefix + "."):
            return why
    return None


@dataclass
class OpenedRun:
    """What a training command works on: the directory, the config, whether it continues a
    run, its checkpoint, and the keys changed on resume (``{key: [before, now]}``)."""

    run_dir: Path
    cfg: Config
    continuing: bool
    ckpt: Path | None = None
    changes: dict[str, list] = dataclasses.field(default_factory=dict)


def open_run(cfg: Config, run_dir: Path | None, resume: bool) -> OpenedRun:
    """Validate where a training command writes, before it writes anything.

    ``resume``, or the same config pointed at a directory that already holds its run (rerunning
    a preempted command), continues that run. Rerunning may change only ``train.steps``;
    ``--resume`` may change what does not alter what the checkpoint means (``FIXED_ON_RESUME``
    lists what it may not), and the changes are printed and recorded in the run. A fresh run
    goes into a new or empty directory only (``rundir.check_new_run_dir``).
    """
    chosen = run_dir or (Path(cfg.run_dir) if cfg.run_dir else None)
    if chosen is None:
        stem = Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        chosen, i = stem, 1
        while chosen.exists():
            chosen, i = Path(f"{stem}-{i}"), i + 1
        check_new_run_dir(chosen)
        return OpenedRun(chosen, cfg, False)
    if not is_run(chosen) or not (chosen / CONFIG_FILE).is_file():
        if resume:
            raise CheckpointError(f"'{chosen}' is not an ldmkit run directory (no {CONFIG_FILE})")
        check_new_run_dir(chosen)
        return OpenedRun(chosen, cfg, False)
    check_no_links(chosen)
    saved = load_config(chosen / CONFIG_FILE, saved=True)
    if cfg.diffusion.latent_scale_factor is None:  # calibrated when the run started
        cfg = dataclasses.replace(cfg, diffusion=dataclasses.replace(
            cfg.diffusion, latent_scale_factor=saved.diffusion.latent_scale_factor))
    diff = _differences(to_dict(saved), to_dict(cfg))
    refused = [k for k in diff if (_fixed_on_resume(k) if resume else k not in CONTINUABLE)]
    if refused:
        key = refused[0]
        there, here = brief(_get(saved, key)), brief(_get(cfg, key))
        if resume:
            raise CheckpointError(f"cannot change {key} when resuming ({there} -> {here}): "
                                  f"{_fixed_on_resume(key)}; start a new run instead "
                                  f"(autoencoder.pretrained: {chosen} reuses its stage 1)")
        raise CheckpointError(f"run directory '{chosen}' already holds a run with another config "
                              f"({key}: {there} there, {here} here); continue it with `ldmkit "
                              f"train --resume {chosen}` or choose another run_dir")
    changes = {k: [_get(saved, k), _get(cfg, k)] for k in diff}
    return OpenedRun(chosen, cfg, True, last_checkpoint_or_none(chosen), changes)


def record_changes(opened: OpenedRun) -> None:
    """Print and append to ``RUN/changes.jsonl`` what ``--resume --set`` changed."""
    if not opened.changes:
        return
    step = int(opened.ckpt.name.split("_")[1]) if opened.ckpt else 0
    print("resume: changed " + ", ".join(f"{k} {brief(a)} -> {brief(b)}"
                                         for k, (a, b) in opened.changes.items()))
    with open_append(opened.run_dir / CHANGES_FILE) as fh:
        fh.write(json.dumps({"at_step": step, "changed": opened.changes}) + "\n")


def check_checkpoint(cfg: Config, run_dir: Path, ckpt: Path) -> None:
    """Before a resume writes anything: the checkpoint is readable (``load_checkpoint`` checks
    its meta.json) and its weights fit this config's model."""
    weights, _, _ = load_checkpoint(ckpt)
    backbone_from(run_backbone(cfg, load_autoencoder(run_dir / AE_DIR)), weights, "model.",
                  f"checkpoint '{ckpt}' does not match this config's model", "resume with the "
                  "run's own config")


def _get(cfg: Config, dotted: str) -> object:
    node: object = to_dict(cfg)
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def load_run_config(run_dir: str | Path, overrides: list[str] | None = None) -> Config:
    """The resolved config a run was started with, plus ``--set`` overrides (e.g. more steps)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"'{run_dir}' is not an ldmkit run directory (no {CONFIG_FILE})")
    return load_config(path, overrides, saved=True)


def last_checkpoint_or_none(run_dir: Path) -> Path | None:
    try:
        return latest_checkpoint(run_dir)
    except CheckpointError:
        return None


CLASSES_FILE = "classes.json"  # a folder dataset's class names, label by label


def run_classes(run_dir: Path) -> list[str] | None:
    """The class names a run's labels stand for (folder datasets), or None."""
    try:
        names = json.loads((Path(run_dir) / CLASSES_FILE).read_text())
    except (OSError, ValueError):
        return None
    return names if isinstance(names, list) and all(isinstance(n, str) for n in names) else None


def run_backbone(cfg: Config, ae: Autoencoder) -> dict:
    """The backbone spec of ``cfg.model`` on the latents of ``ae``."""
    return backbone_spec(cfg.model, ae.latent_channels, cfg.data.image_size // ae.downsample_factor)


class Trained(NamedTuple):
    """A run's checkpoint, ready to sample: ``model`` holds the EMA weights, in eval mode."""

    config: dict
    step: int
    model: nn.Module
    ae: Autoencoder
    scale: float
    backbone: dict  # models/registry.py spec: the type and arguments the checkpoint recorded


def load_for_sampling(run_dir: Path, ckpt: Path | None = None) -> Trained:
    """A run's last checkpoint (or ``ckpt``, one of its ``checkpoints/step_*``), with the EMA
    weights in the backbone the checkpoint recorded (the config's, for checkpoints written
    before the registry)."""
    ckpt = ckpt or latest_checkpoint(run_dir)
    weights, _, meta = load_checkpoint(ckpt)
    cfg = from_dict(meta["config"])
    ae = load_autoencoder(run_dir / AE_DIR)
    spec = meta.get("backbone") or run_backbone(cfg, ae)
    model = backbone_from(spec, weights, "ema.", f"checkpoint '{ckpt}' does not match its "
                          "config", "the checkpoint is damaged: sample an older one")
    return Trained(meta["config"], meta["step"], model.eval(), ae,
                   float(meta["latent_scale_factor"]), spec)


def backbone_from(spec: dict, weights: dict[str, torch.Tensor], prefix: str, mismatch: str,
                  fix: str) -> nn.Module:
    """The spec's backbone holding the ``prefix`` weights, or a one-line CheckpointError."""
    try:
        model = build_backbone(spec)
        model.load_state_dict(split_prefix(weights, prefix))
    except (RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{mismatch} ({str(exc).splitlines()[0][:200]}); {fix}") from None
    return model
