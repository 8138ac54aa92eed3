"""A pretrained pipeline's noise path, as its trainers draw it, for the probe's fixed points.

A probe point is a level ``u`` in [0, 1] (stratified, stored), an image and a noise tensor. ``u``
is where the trainer's own draw of the noise level falls, so the ten ``validation/loss_t*``
buckets of ldmkit's runs mean the same here: bucket k holds ``u`` in [k / 10, (k + 1) / 10).

- A discrete VP scheduler (DDPM, DDIM, Euler...: Stable Diffusion 1.x/2.x, XL) trains on the
  timestep index ``floor(u T)`` of its ``alphas_cumprod`` (diffusers' ``train_text_to_image.py``
  and kohya's ``train_network.py`` draw it uniformly), predicting ``epsilon``, ``v_prediction``
  or ``sample`` as the scheduler's ``prediction_type`` says.
- A flow-matching scheduler (SD3, Flux) noises to ``sigma = shift u / (1 + (shift - 1) u)``,
  its timestep shift (Esser et al. 2024, sec. 5.3.2): the scheduler's ``shift``, or Flux's
  resolution-dependent ``exp(mu)`` (diffusers' ``calculate_shift``), and predicts the velocity
  ``eps - x0``.

The estimates and targets are the objective registry's (``ldmkit.diffusion.registry``), fed with
each point's ``alpha`` and ``sigma``, so the probe's eps-MSE and cosine are computed as a
training run's are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ldmkit.diffusion.registry import OBJECTIVE_ALIASES, OBJECTIVES
from ldmkit.errors import ConfigError


@dataclass(frozen=True)
class Noised:
    """The points of one batch, noised: what the network is fed and scored against."""

    z_t: torch.Tensor  # [B, C, h, w]
    timestep: torch.Tensor  # [B] in the network's own units
    target: torch.Tensor  # [B, C, h, w] what the objective regresses onto
    alpha: torch.Tensor  # [B, 1, 1, 1]
    sigma: torch.Tensor  # [B, 1, 1, 1]
    t: torch.Tensor  # [B, 1, 1, 1] the flow's time (sigma), the registry's ``t``


@dataclass(frozen=True)
class NoisePath:
    """``objective``: the registry's name; ``alphas_cumprod``: a discrete schedule's (None for
    flow matching); ``shift``: the flow's timestep shift; ``timestep_scale``: what the network's
    timestep input is per unit of sigma (SD3: 1000, Flux: 1)."""

    objective: str
    alphas_cumprod: torch.Tensor | None = field(default=None, repr=False)
    shift: float = 1.0
    timestep_scale: float = 1000.0

    def noise(self, z0: torch.Tensor, u: torch.Tensor, eps: torch.Tensor) -> Noised:
        """Noise scaled latents ``z0 [B, C, h, w]`` to levels ``u [B]`` with ``eps``."""
        shape = (-1, 1, 1, 1)
        if self.alphas_cumprod is None:
            sigma = self.shift * u / (1 + (self.shift - 1) * u)
            alpha, timestep = 1 - sigma, sigma * self.timestep_scale
        else:
            steps = len(self.alphas_cumprod)
            index = (u * steps).long().clamp(0, steps - 1)
            bar = self.alphas_cumprod.to(z0.device)[index].double()
            alpha, sigma, timestep = bar.sqrt(), (1 - bar).sqrt(), index
        alpha = alpha.to(z0.dtype).view(shape)
        sigma = sigma.to(z0.dtype).view(shape)
        spec = OBJECTIVES[self.objective]
        return Noised(alpha * z0 + sigma * eps, timestep, spec.target(z0, eps, alpha, sigma),
                      alpha, sigma, sigma)

    def eps_of(self, out: torch.Tensor, noised: Noised) -> torch.Tensor:
        """The noise the network's output implies (the registry's estimate)."""
        return OBJECTIVES[self.objective].estimates(out, noised.z_t, noised.alpha, noised.sigma,
                                                    noised.t)[1]


def discrete_path(scheduler_config: dict[str, Any], alphas_cumprod: torch.Tensor) -> NoisePath:
    """The path of a VP scheduler, by its ``prediction_type``."""
    kind = str(scheduler_config.get("prediction_type", "epsilon"))
    objective = OBJECTIVE_ALIASES.get(kind)
    if objective not in ("eps", "v", "x0"):
        raise ConfigError(f"the scheduler's prediction_type '{kind[:40]}' is not one ldmkit "
                          "probes (epsilon, v_prediction, sample); fix scheduler_config.json")
    return NoisePath(objective, alphas_cumprod.double())


def flow_path(scheduler_config: dict[str, Any], image_tokens: int | None = None,
              timestep_scale: float = 1000.0) -> NoisePath:
    """The path of a flow-matching scheduler: its fixed ``shift``, or with
    ``use_dynamic_shifting`` (Flux) ``exp(mu)`` for ``image_tokens`` packed latent tokens, as
    the pipeline samples at that resolution."""
    if scheduler_config.get("use_dynamic_shifting") and image_tokens is not None:
        base, top = scheduler_config.get("base_shift", 0.5), scheduler_config.get("max_shift", 1.15)
        lo = scheduler_config.get("base_image_seq_len", 256)
        hi = scheduler_config.get("max_image_seq_len", 4096)
        mu = base + (top - base) * (image_tokens - lo) / (hi - lo)
        shift = math.exp(mu)
    else:
        shift = float(scheduler_config.get("shift", 1.0))
    if not (math.isfinite(shift) and shift > 0):
        raise ConfigError(f"the scheduler's shift {shift} is not a positive number; fix "
                          "scheduler_config.json")
    return NoisePath("flow", None, shift, timestep_scale)
