"""The stage-2 backbones by name (DiT's ``DiT_models``, litgpt's ``Config.from_name``).

A run's config chooses one with ``model.type``; its checkpoints record a *spec*, the type and
every constructor argument, so ``sample``, ``eval``, ``resume`` and ``export`` rebuild the
network from the checkpoint alone. An entry names the network, its ``model:`` config section
(whose ``check`` validates it against the latent size) and its diffusers export adapter
(``models/diffusers_export.py``, imported only when exporting: diffusers is optional); a new
backbone is one entry here plus its config section in ``config/schema.py``'s ``MODELS``.
A backbone maps ``(x [B, C, h, w], t [B] in [0, 1])`` to a tensor shaped like ``x``; what that
tensor means is the parameterization's business (diffusion/parameterization.py).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ldmkit.config import DiTConfig, UNetConfig
from ldmkit.errors import LdmkitError
from ldmkit.models.dit import DiT
from ldmkit.models.hf_text import encoder_info
from ldmkit.models.unet import UNet


@dataclass(frozen=True)
class Backbone:
    name: str
    network: type[nn.Module]
    config: type  # the ``model:`` section of this type (config/schema.py)
    export: str  # the function of models/diffusers_export.py that writes it for diffusers


BACKBONES: dict[str, Backbone] = {b.name: b for b in (
    Backbone("unet", UNet, UNetConfig, "export_unet"),
    Backbone("dit", DiT, DiTConfig, "export_dit"),
)}


def backbone_spec(model_config: Any, in_channels: int, latent_size: int) -> dict:
    """``{"type", "args"}`` of the backbone a ``model:`` config section describes, for latents
    of ``in_channels`` x ``latent_size`` x ``latent_size``. The text encoder's settings enter
    only with a text encoder, so other models' specs are those written before it existed; a
    frozen encoder's widths are read from its ``config.json``."""
    args = {k: v for k, v in dataclasses.asdict(model_config).items() if k != "type"
            and (model_config.text_encoder or not k.startswith("text_"))}
    if model_config.text_encoder not in (None, "builtin"):  # a frozen encoder's widths
        info = encoder_info(model_config.text_encoder)
        args.update(text_context_dim=info.context_dim, text_pooled_dim=info.pooled_dim)
    return {"type": model_config.type,
            "args": {"in_channels": in_channels, "latent_size": latent_size, **args}}


def build_backbone(spec: dict) -> nn.Module:
    """The network a spec describes; ValueError naming what is wrong with a spec read from a
    file (an unknown type, a missing or unknown argument)."""
    if not isinstance(spec, dict) or spec.get("type") not in BACKBONES:
        kind = spec.get("type") if isinstance(spec, dict) else spec
        raise ValueError(f"unknown backbone type {str(kind)[:40]!r} (known: "
                         f"{', '.join(BACKBONES)})")
    cls, args = BACKBONES[spec["type"]].network, spec.get("args")
    if not isinstance(args, dict):
        raise ValueError(f"backbone {spec['type']} has no argument mapping")
    try:
        inspect.signature(cls).bind(**args)
    except TypeError as exc:
        raise ValueError(f"backbone {spec['type']}: {exc}") from None
    return cls(**args)


def export_backbone(spec: dict, model: nn.Module, out: Path) -> None:
    """Write a backbone as a diffusers model directory under ``out`` by its entry's adapter;
    an unknown type is a one-line error, never written as another backbone."""
    entry = BACKBONES.get(spec.get("type")) if isinstance(spec, dict) else None
    if entry is None:
        raise LdmkitError(f"cannot export backbone type {str(spec.get('type'))[:40]!r}: ldmkit "
                          f"exports {', '.join(BACKBONES)}; sample the run with `ldmkit sample`")
    adapter = getattr(importlib.import_module("ldmkit.models.diffusers_export"), entry.export)
    adapter(model, spec["args"], out)
