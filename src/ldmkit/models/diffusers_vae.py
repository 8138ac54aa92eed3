"""A diffusers ``AutoencoderKL`` saved in a local directory, used as ldmkit's stage 1.

Users often have a VAE already (Stable Diffusion's, or one trained with diffusers). Pointing
``autoencoder.pretrained`` at its directory (``config.json`` + safetensors weights) makes it
the frozen stage 1: ldmkit still calibrates the latent scale from the data and compares it
with the VAE's own ``scaling_factor`` (``latents.prepare_latents``). Only safetensors weights
are loaded, from disk, never downloaded. diffusers is needed for this path only.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ldmkit.errors import CheckpointError
from ldmkit.models.autoencoder import Posterior
from ldmkit.platform.files import read_json

CONFIG_FILE = "config.json"


def is_diffusers_vae(path: Path) -> bool:
    try:
        config = read_json(path / CONFIG_FILE)
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("_class_name") == "AutoencoderKL"


class DiffusersAutoencoder(nn.Module):
    """ldmkit's autoencoder interface (``encode`` -> Posterior, ``decode``) over AutoencoderKL."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae
        config = vae.config
        self.in_channels = int(config.in_channels)
        self.latent_channels = int(config.latent_channels)
        self.downsample_factor = 2 ** (len(config.block_out_channels) - 1)
        self.scaling_factor = float(config.scaling_factor)

    def encode(self, x: torch.Tensor) -> Posterior:
        dist = self.vae.encode(x).latent_dist
        return Posterior(dist.mean.float(), dist.logvar.float())  # fp32 under autocast too

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z).sample.float()


def load_diffusers_vae(path: Path) -> DiffusersAutoencoder:
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise CheckpointError(f"'{path}' is a diffusers AutoencoderKL; install diffusers "
                              "(pip install diffusers) to use it as stage 1") from None
    try:
        vae = AutoencoderKL.from_pretrained(str(path), local_files_only=True, use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"diffusers AutoencoderKL at '{path}' cannot be loaded "
                              f"({str(exc).splitlines()[0]}); it needs config.json and "
                              "safetensors weights") from None
    return DiffusersAutoencoder(vae).eval().requires_grad_(False)
