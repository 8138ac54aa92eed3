"""Continuous-time variance-preserving cosine schedule, written in log-SNR.

``x_t = alpha(t) * x_0 + sigma(t) * eps`` with ``alpha^2 + sigma^2 = 1`` and
``logsnr(t) = -2 log tan(a t + b)``: the cosine schedule of Nichol & Dhariwal (2021) in the
continuous form of Kingma et al. (2021, "VDM") and Hoogeboom et al. (2023), clipped to
``[logsnr_min, logsnr_max]`` so both endpoints are finite.

Why the noisy end is not pushed to ~0 SNR: integrated in ``x / alpha``, DDIM turns an
eps-prediction error into a sample error of about ``eps_error * sigma / alpha`` at the start,
i.e. ``exp(-logsnr_min / 2)``. Measured on the digits demo: logsnr_min = -15 gave sample latents
with std 207 (target 1.37), -6 gave 1.69, -4 gave 1.33. The default -5 (sigma/alpha ~ 12) matches
the terminal SNR of Stable Diffusion's schedule; sampling starts from N(0, I) there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch


class Schedule(Protocol):
    """What losses and samplers need of a noise schedule: ``x_t = alpha x0 + sigma eps``."""

    def logsnr(self, t: torch.Tensor) -> torch.Tensor: ...

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass(frozen=True)
class CosineSchedule:
    logsnr_min: float = -5.0
    logsnr_max: float = 10.0

    def logsnr(self, t: torch.Tensor) -> torch.Tensor:
        """log(alpha^2 / sigma^2) at ``t`` in [0, 1]; decreasing from logsnr_max to logsnr_min."""
        b = math.atan(math.exp(-0.5 * self.logsnr_max))
        a = math.atan(math.exp(-0.5 * self.logsnr_min)) - b
        return -2.0 * torch.log(torch.tan(a * t.double() + b))

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Signal and noise coefficients at ``t``, float32, same shape as ``t``."""
        lam = self.logsnr(t)
        return torch.sigmoid(lam).sqrt().float(), torch.sigmoid(-lam).sqrt().float()


@dataclass(frozen=True)
class LinearSchedule:
    """The rectified-flow path ``x_t = (1 - t) x0 + t eps`` (Liu et al. 2022; Esser et al. 2024):
    pure noise at t = 1 (alpha = 0), data at t = 0; not variance preserving."""

    def logsnr(self, t: torch.Tensor) -> torch.Tensor:
        t = t.double()
        return 2.0 * (torch.log1p(-t) - torch.log(t))  # +-inf at the ends

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (1.0 - t.double()).float(), t.double().float()


def add_noise(schedule: Schedule, x0: torch.Tensor, t: torch.Tensor,
              noise: torch.Tensor) -> torch.Tensor:
    """``x_t`` for clean latents ``x0 [B, ...]`` at times ``t [B]``."""
    alpha, sigma = schedule.alpha_sigma(t)
    shape = (-1,) + (1,) * (x0.dim() - 1)
    return alpha.view(shape) * x0 + sigma.view(shape) * noise


def sample_t(batch: int, method: str, generator: torch.Generator, loc: float = 0.0,
             scale: float = 1.0) -> torch.Tensor:
    """Training times ``[B]`` in (0, 1): uniform, or logit-normal (Esser et al. 2024, "SD3").

    The metric ``diffusion/t_mean`` must average ~0.5 (guide, diffusion/t_mean): a logit-normal
    with ``loc != 0`` shifts it on purpose, and the diagnosis reports that as biased sampling.
    """
    if method == "uniform":
        return torch.rand(batch, generator=generator)
    if method == "logit_normal":
        return torch.sigmoid(loc + scale * torch.randn(batch, generator=generator))
    raise ValueError(f"unknown t_sampling '{method}'; use uniform or logit_normal")
