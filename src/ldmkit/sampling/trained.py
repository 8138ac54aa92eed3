"""Opening a trained run for sampling, evaluation and export: the backbone its checkpoint
recorded, holding the EMA weights, and its autoencoder."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from ldmkit.config import Config, from_dict
from ldmkit.data.stage1 import load_autoencoder
from ldmkit.errors import CheckpointError
from ldmkit.models.autoencoder import Autoencoder
from ldmkit.models.registry import backbone_spec, build_backbone
from ldmkit.run.checkpoint import (
    load_checkpoint,
    split_prefix,
)
from ldmkit.run.layout import RunDir


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
    run = RunDir(run_dir)
    ckpt = ckpt or run.latest_checkpoint()
    weights, _, meta = load_checkpoint(ckpt)
    cfg = from_dict(meta["config"])
    ae = load_autoencoder(run.autoencoder)
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
