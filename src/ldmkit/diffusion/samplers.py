"""Samplers over any ``denoise(x, t) -> x0_hat`` callable, with a callback per step (k-diffusion).

``denoise`` returns the *denoised* estimate (``Parameterization.denoiser``); the noise estimate
is derived from it, so the same samplers serve eps-, v-, x0- and flow models on any schedule.
Euler and Heun (Karras et al. 2022) integrate the probability-flow ODE; for the flow objective
Euler is the usual rectified-flow sampler. DDIM (Song et al. 2021, eq. 12) with
``eta = 0`` is deterministic; ``eta = 1`` is the ancestral DDPM sampler (Ho et al. 2020), whose
per-step variance DDIM's family contains (Song et al. 2021, sec. 4.1). DPM-Solver++(2M)
(Lu et al. 2022, Algorithm 2) is a second-order multistep solver of the same ODE in the
half-log-SNR variable: as good at 10-20 steps as DDIM at several times more.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ldmkit.diffusion.parameterization import Denoiser, Net, Parameterization
from ldmkit.diffusion.registry import SAMPLERS
from ldmkit.diffusion.schedule import Schedule

StepCallback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


def eps_denoiser(eps_model: Net, schedule: Schedule) -> Denoiser:
    """A noise predictor as a denoiser: ``x0_hat = (x - sigma eps_hat) / alpha``."""
    return Parameterization("eps", schedule).denoiser(eps_model)


def time_grid(steps: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``steps + 1`` times from 1 (pure noise) to 0 (data), evenly spaced."""
    return torch.linspace(1.0, 0.0, steps + 1, device=device)


@torch.no_grad()
def sample_ddim(denoise: Denoiser, noise: torch.Tensor, schedule: Schedule, steps: int,
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
        # the forward process's posterior std at eta = 1 (Song et al. 2021, eq. 16), written
        # for any schedule: s' sqrt(1 - (a s' / (a' s))^2), DDIM's own form when a^2 + s^2 = 1
        c = eta * s_next * (1 - (a * s_next / (a_next * s)) ** 2).clamp(min=0).sqrt()
        c = torch.minimum(c, s_next)
        x = a_next * x0 + torch.sqrt(s_next**2 - c**2) * eps
        if eta > 0:
            x = x + c * torch.randn(x.shape, generator=generator, device=x.device)
    return x


def sample_ddpm(denoise: Denoiser, noise: torch.Tensor, schedule: Schedule, steps: int,
                generator: torch.Generator | None = None,
                callback: StepCallback | None = None) -> torch.Tensor:
    """Ancestral sampling: DDIM with ``eta = 1``, fresh noise at every step."""
    return sample_ddim(denoise, noise, schedule, steps, 1.0, generator, callback)


@torch.no_grad()
def sample_dpmpp_2m(denoise: Denoiser, noise: torch.Tensor, schedule: Schedule, steps: int,
                    callback: StepCallback | None = None) -> torch.Tensor:
    """DPM-Solver++(2M): ``x' = (sigma'/sigma) x - alpha' expm1(-h) D`` with
    ``h = lambda' - lambda`` (``lambda = logsnr / 2``) and ``D`` the denoised estimate,
    extrapolated linearly in ``lambda`` from the last two steps (the first step is DDIM's).
    It integrates to t = 0 itself (sigma = exp(-logsnr_max / 2) there) with a first-order last
    step, as k-diffusion does: extrapolating over that long last step in lambda is unstable."""
    x = noise
    grid = time_grid(steps, noise.device)
    previous: tuple[torch.Tensor, torch.Tensor] | None = None  # (x0_hat, h) of the last step
    for i in range(steps):
        t = grid[i].expand(x.shape[0])
        x0 = denoise(x, t)
        if callback is not None:
            callback(i, grid[i], x, x0)
        lam = 0.5 * schedule.logsnr(grid[i : i + 2])
        h = (lam[1] - lam[0]).float()
        (_, a_next), (s, s_next) = schedule.alpha_sigma(grid[i : i + 2])
        d = x0
        if previous is not None and i < steps - 1:  # the last step, into t = 0, is first order
            old_x0, h_prev = previous
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * old_x0
        x = (s_next / s) * x - a_next * torch.expm1(-h) * d
        previous = (x0, h)
    return x


@torch.no_grad()
def sample_heun(denoise: Denoiser, noise: torch.Tensor, schedule: Schedule, steps: int,
                callback: StepCallback | None = None, second_order: bool = True) -> torch.Tensor:
    """Heun's method (Karras et al. 2022, Algorithm 1) on the probability-flow ODE written in
    ``x / alpha`` against ``sigma / alpha``, whose slope is the noise estimate: an Euler step
    there is a DDIM step, and Heun averages its slope with the slope at the step's end
    (2 * steps - 1 network calls). The last step, into t = 0, and a step from alpha = 0 (the
    flow path's t = 1, where ``sigma / alpha`` is infinite) are Euler steps, as in Karras.
    ``second_order=False`` is Euler's method throughout (``steps`` calls). On a uniform t grid
    the trapezoid needs moderate ``sigma / alpha`` ratios between steps: measured exact on
    Gaussian data for logsnr_min -5 (the default) and -10, unstable at -20."""
    x = noise
    grid = time_grid(steps, noise.device)
    for i in range(steps):
        x0 = denoise(x, grid[i].expand(x.shape[0]))
        if callback is not None:
            callback(i, grid[i], x, x0)
        (a, a_next), (s, s_next) = schedule.alpha_sigma(grid[i : i + 2])
        eps = (x - a * x0) / s
        x_next = a_next * x0 + s_next * eps
        if second_order and i < steps - 1 and a > 0:
            x0_end = denoise(x_next, grid[i + 1].expand(x.shape[0]))
            eps_end = (x_next - a_next * x0_end) / s_next
            x_next = a_next * (x / a + (s_next / a_next - s / a) * 0.5 * (eps + eps_end))
        x = x_next
    return x


SAMPLER_NAMES = SAMPLERS


def run_sampler(name: str, denoise: Denoiser, noise: torch.Tensor, schedule: Schedule,
                steps: int, eta: float = 0.0, generator: torch.Generator | None = None,
                callback: StepCallback | None = None) -> torch.Tensor:
    """Dispatch by name; ``eta`` applies to DDIM only."""
    if name == "dpmpp_2m":
        return sample_dpmpp_2m(denoise, noise, schedule, steps, callback)
    if name == "ddim":
        return sample_ddim(denoise, noise, schedule, steps, eta, generator, callback)
    if name == "ddpm":
        return sample_ddpm(denoise, noise, schedule, steps, generator, callback)
    if name in ("euler", "heun"):
        return sample_heun(denoise, noise, schedule, steps, callback, name == "heun")
    raise ValueError(f"unknown sampler '{name}'; use one of {', '.join(SAMPLER_NAMES)}")
