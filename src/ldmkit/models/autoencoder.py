"""Stage 1: a convolutional KL autoencoder (Rombach et al. 2022, "LDM", sec. 3; Kingma & Welling 2014).

The encoder outputs a diagonal Gaussian posterior; a small KL term keeps the latent space smooth
so stage 2 can model it. The latent scale is *not* a constant here: it is calibrated from data
(``ldmkit.data.stage1.calibrate_latent_scale``) and stored with the run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ldmkit.models.layers import Downsample, ResBlock, Upsample, group_norm


@dataclass(frozen=True)
class Posterior:
    """Diagonal Gaussian ``N(mean, exp(logvar))`` over latents ``[B, C, h, w]``."""

    mean: torch.Tensor
    logvar: torch.Tensor

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device)
        return self.mean + torch.exp(0.5 * self.logvar) * noise

    def kl(self) -> torch.Tensor:
        """KL to N(0, I) per latent element, averaged over the batch ``[]``."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).mean()


class Encoder(nn.Module):
    def __init__(self, in_ch: int, base: int, mult: list[int], z_ch: int):
        super().__init__()
        chans = [base * m for m in mult]
        self.conv_in = nn.Conv2d(in_ch, chans[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for i, c in enumerate(chans):
            blocks.append(ResBlock(chans[max(i - 1, 0)], c))
            if i < len(chans) - 1:
                blocks.append(Downsample(c))
        blocks.append(ResBlock(chans[-1], chans[-1]))
        self.blocks = nn.Sequential(*blocks)
        self.norm = group_norm(chans[-1])
        self.conv_out = nn.Conv2d(chans[-1], 2 * z_ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.norm(self.blocks(self.conv_in(x)))))


class Decoder(nn.Module):
    def __init__(self, out_ch: int, base: int, mult: list[int], z_ch: int):
        super().__init__()
        chans = [base * m for m in reversed(mult)]
        self.conv_in = nn.Conv2d(z_ch, chans[0], 3, padding=1)
        blocks: list[nn.Module] = [ResBlock(chans[0], chans[0])]
        for i, c in enumerate(chans):
            blocks.append(ResBlock(chans[max(i - 1, 0)], c))
            if i < len(chans) - 1:
                blocks.append(Upsample(c))
        self.blocks = nn.Sequential(*blocks)
        self.norm = group_norm(chans[-1])
        self.conv_out = nn.Conv2d(chans[-1], out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.norm(self.blocks(self.conv_in(z)))))


class Autoencoder(nn.Module):
    """``encode``: pixels [B, C, H, W] in [-1, 1] -> Posterior over [B, z, H/f, W/f]; ``decode`` back."""

    def __init__(self, channels: int, base_channels: int, channel_mult: list[int],
                 latent_channels: int):
        super().__init__()
        self.downsample_factor = 2 ** (len(channel_mult) - 1)
        self.in_channels = channels
        self.latent_channels = latent_channels
        self.encoder = Encoder(channels, base_channels, channel_mult, latent_channels)
        self.decoder = Decoder(channels, base_channels, channel_mult, latent_channels)

    def encode(self, x: torch.Tensor) -> Posterior:
        mean, logvar = self.encoder(x).float().chunk(2, dim=1)  # fp32 under autocast too
        return Posterior(mean, logvar.clamp(-30.0, 20.0))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z).float()

    def forward(self, x: torch.Tensor, noise: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stage 1's training pass: ``x`` -> (reconstruction from the posterior sample with
        ``noise`` ``[B, z, h, w]``, mean, logvar). The noise comes in, so that the pass holds
        no generator and compiles as one graph."""
        post = self.encode(x)
        return self.decode(post.mean + torch.exp(0.5 * post.logvar) * noise), post.mean, \
            post.logvar
