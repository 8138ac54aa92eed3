"""Samplers over any ``denoise(x, t) -> x0_hat`` callable, with a callback per step (k-diffusion).

``denoise`` returns the *denoised* estimate; the noise estimate is derived from it, so the same
samplers serve eps-, x0- or v-predicting models. DDIM (Song et al. 2021, eq. 12) with
``eta = 0`` is deterministic; ``eta = 1`` is the ancestral DDPM sampler (Ho et al. 2020), whose
per-step variance DDIM's family contains (Song et al. 2021, sec. 4.1).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ldmkit.diffusion.losses import EpsModel
from ldmkit.diffusion.schedule import CosineSchedule

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepCallback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


def eps_denoiser(eps_model: EpsModel, schedule: CosineSchedule) -> Denoiser:
    """Turn a noise predictor into a denoiser: ``x0_hat = (x - sigma eps_hat) / alpha``."""

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = schedule.alpha_sigma(t)
        shape = (-1,) + (1,) * (x.dim() - 1)
        return (x - sigma.view(shape) * eps_model(x, t)) / alpha.view(shape)

    return denoise


def time_grid(steps: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``steps + 1`` times from 1 (pure noise) to 0 (data), evenly spaced."""
    return torch.linspace(1.0, 0.0, steps + 1, device=device)


@torch.no_grad()
def sample_ddim(denoise: Denoiser, noise: torch.Tensor, schedule: CosineSchedule, steps: int,
                eta: float = 0.0, generator: torch.Generator | None = None,
                callback: StepCallback | None = None) -> torch.Tensor:
    """Integrate from ``noise`` (x at t=1) to t=0 in ``steps`` DDIM steps.

    ``callback(i, t, x, x0_hat)`` sees every step. The last step returns the denoised estimate.
    """
    x = noise
    grid = time_grid(steps, noise.device)
    for i in range(steps):
        t, t_next = grid[i].expand(x.shape[0]), grid[i + 1]
        x0 = denoise(x, t)
        if callback is not None:
            callback(i, grid[i], x, x0)
        if i == steps - 1:
            return x0
        a, s = (v[0] for v in schedule.alpha_sigma(t[:1]))
        a_next, s_next = (v[0] for v in schedule.alpha_sigma(t_next[None]))
        eps = (x - a * x0) / s
        c = eta * torch.sqrt((s_next**2 / s**2) * (1 - (a / a_next) ** 2)).clamp(min=0)
        c = torch.minimum(c, s_next)
        x = a_next * x0 + torch.sqrt(s_next**2 - c**2) * eps
        if eta > 0:
            x = x + c * torch.randn(x.shape, generator=generator, device=x.device)
    return x


def sample_ddpm(denoise: Denoiser, noise: torch.Tensor, schedule: CosineSchedule, steps: int,
                generator: torch.Generator | None = None,
                callback: StepCallback | None = None) -> torch.Tensor:
    """Ancestral sampling: DDIM with ``eta = 1``, fresh noise at every step."""
    return sample_ddim(denoise, noise, schedule, steps, 1.0, generator, callback)


SAMPLER_NAMES = ("ddpm", "ddim")


def run_sampler(name: str, denoise: Denoiser, noise: torch.Tensor, schedule: CosineSchedule,
                steps: int, eta: float = 0.0, generator: torch.Generator | None = None,
                callback: StepCallback | None = None) -> torch.Tensor:
    """Dispatch by name; ``eta`` applies to DDIM only."""
    if name == "ddim":
        return sample_ddim(denoise, noise, schedule, steps, eta, generator, callback)
    if name == "ddpm":
        return sample_ddpm(denoise, noise, schedule, steps, generator, callback)
    raise ValueError(f"unknown sampler '{name}'; use one of {', '.join(SAMPLER_NAMES)}")
