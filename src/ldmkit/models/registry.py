"""The stage-2 backbones by name (DiT's ``DiT_models``, litgpt's ``Config.from_name``).

A run's config chooses one with ``model.type``; its checkpoints record a *spec*, the type and
every constructor argument, so ``sample``, ``eval``, ``resume`` and ``export`` rebuild the
network from the checkpoint alone. A backbone maps ``(x [B, C, h, w], t [B] in [0, 1])`` to a
tensor shaped like ``x``; what that tensor means is the parameterization's business
(diffusion/parameterization.py).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from torch import nn

from ldmkit.models.dit import DiT
from ldmkit.models.unet import UNet

BACKBONES: dict[str, type[nn.Module]] = {"unet": UNet, "dit": DiT}


def backbone_spec(model_config: Any, in_channels: int, latent_size: int) -> dict:
    """``{"type", "args"}`` of the backbone a ``model:`` config section describes, for latents
    of ``in_channels`` x ``latent_size`` x ``latent_size``."""
    args = {k: v for k, v in dataclasses.asdict(model_config).items() if k != "type"}
    return {"type": model_config.type,
            "args": {"in_channels": in_channels, "latent_size": latent_size, **args}}


def build_backbone(spec: dict) -> nn.Module:
    """The network a spec describes; ValueError naming what is wrong with a spec read from a
    file (an unknown type, a missing or unknown argument)."""
    if not isinstance(spec, dict) or spec.get("type") not in BACKBONES:
        kind = spec.get("type") if isinstance(spec, dict) else spec
        raise ValueError(f"unknown backbone type {str(kind)[:40]!r} (known: "
                         f"{', '.join(BACKBONES)})")
    cls, args = BACKBONES[spec["type"]], spec.get("args")
    if not isinstance(args, dict):
        raise ValueError(f"backbone {spec['type']} has no argument mapping")
    try:
        inspect.signature(cls).bind(**args)
    except TypeError as exc:
        raise ValueError(f"backbone {spec['type']}: {exc}") from None
    return cls(**args)
