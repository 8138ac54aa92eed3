"""The one object between the backbone and everything else (k-diffusion's ``Denoiser``, EDM2's
``Precond`` + loss): it turns the network's output into estimates of the clean latents (x0) and
the noise (eps), and computes the training loss. Samplers, the vital signs, validation and
export see those estimates only, never the objective. The objectives themselves are entries of
``diffusion/registry.py``.

Loss weighting ``min_snr`` (Hang et al. 2023) weights each sample so that its loss, expressed
as an x0-error, counts ``min(snr, gamma)``: the objective's squared error equals ``c(t)`` times
the x0 error (``Objective.x0_error_factor``), so the weight is ``min(snr, gamma) / c(t)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ldmkit.diffusion.condition import Cond, guided
from ldmkit.diffusion.registry import OBJECTIVES, Objective
from ldmkit.diffusion.schedule import CosineSchedule, LinearSchedule, Schedule

if TYPE_CHECKING:
    from ldmkit.config import DiffusionConfig

Net = Callable[..., torch.Tensor]  # net(x, t, **cond): a backbone (models/registry.py)
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Prediction:
    out: torch.Tensor  # [B, C, h, w] the network's raw output
    x0: torch.Tensor  # its estimate of the clean latents
    eps: torch.Tensor  # its estimate of the noise


@dataclass
class LossOutput:
    loss: torch.Tensor  # [] the objective's (weighted) mean squared error
    eps_pred: torch.Tensor  # [B, C, h, w] the noise estimate, whatever the objective
    eps: torch.Tensor  # [B, C, h, w] the true noise
    per_sample: torch.Tensor  # [B] the objective's unweighted squared error per sample


def _col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view((-1,) + (1,) * (like.dim() - 1))


@dataclass(frozen=True)
class Parameterization:
    """An objective on a schedule, with its loss weighting (``diffusion.*`` of the config)."""

    objective: str = "eps"
    schedule: Schedule = CosineSchedule()
    weighting: str = "none"
    min_snr_gamma: float = 5.0

    @property
    def spec(self) -> Objective:
        """The objective's registry entry (``diffusion/registry.py``)."""
        return OBJECTIVES[self.objective]

    def predict(self, net: Net, x: torch.Tensor, t: torch.Tensor,
                cond: Cond | None = None) -> Prediction:
        """The network's output at ``(x_t, t)`` (given the condition) as estimates of x0 and
        eps."""
        out = net(x, t, **cond) if cond else net(x, t)
        alpha, sigma = (_col(v, x) for v in self.schedule.alpha_sigma(t))
        x0, eps = self.spec.estimates(out.float(), x, alpha, sigma, _col(t.float(), x))
        return Prediction(out, x0, eps)

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network regresses onto."""
        alpha, sigma = (_col(v, x0) for v in self.schedule.alpha_sigma(t))
        return self.spec.target(x0, eps, alpha, sigma)

    def weight(self, t: torch.Tensor) -> torch.Tensor | None:
        """Per-sample loss weights ``[B]``, or None for the plain mean."""
        if self.weighting == "none":
            return None
        snr = self.schedule.logsnr(t).exp()
        return (snr.clamp(max=self.min_snr_gamma) / self.spec.x0_error_factor(snr, t)).float()

    def noised(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """``x_t = alpha(t) x0 + sigma(t) eps``."""
        alpha, sigma = (_col(v, x0) for v in self.schedule.alpha_sigma(t))
        return alpha * x0 + sigma * eps

    def loss(self, net: Net, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
             cond: Cond | None = None) -> LossOutput:
        """Noise ``x0`` to ``t`` with ``eps``, predict (given the condition), and score."""
        x = self.noised(x0, t, eps)
        pred = self.predict(net, x, t, cond)
        goal = self.target(x0, eps, t)
        err = (pred.out.float() - goal).pow(2)
        weight = self.weight(t)
        loss = err.mean() if weight is None else (err.flatten(1).mean(1) * weight).mean()
        return LossOutput(loss, pred.eps, eps, err.detach().flatten(1).mean(1))

    def untrained_loss(self, weighted: bool = True) -> float:
        """The loss of a network that outputs 0, on latents of unit variance, averaged over
        uniform t: where the objective's loss starts (the guide's "starts near 1.0" is eps's;
        flow's velocity target has variance 2). The rules read losses in these units."""
        t = (torch.arange(1000, dtype=torch.float64) + 0.5) / 1000
        weight = self.weight(t) if weighted else None
        return self.spec.target_power * (1.0 if weight is None else weight.double().mean().item())

    def denoiser(self, net: Net, cond: Cond | None = None, guidance: float = 1.0,
                 interval: tuple[float, float] = (0.0, 1.0)) -> Denoiser:
        """``(x_t, t) -> x0_hat``: what every sampler integrates with; with a condition and
        ``guidance`` > 1, classifier-free guided (``condition.guided``)."""
        if not cond:
            return lambda x, t: self.predict(net, x, t).x0
        return guided(lambda x, t, c: self.predict(net, x, t, c).x0, cond, guidance, interval)


def parameterization_of(diffusion: DiffusionConfig) -> Parameterization:
    """The config's ``diffusion`` section as a parameterization."""
    d = diffusion
    schedule = CosineSchedule(d.logsnr_min, d.logsnr_max) if d.schedule == "cosine" \
        else LinearSchedule()
    return Parameterization(d.objective, schedule, d.loss_weighting, d.min_snr_gamma)
