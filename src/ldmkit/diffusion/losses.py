"""The denoising loss: MSE between predicted and true noise (Ho et al. 2020, eq. 14).

It wraps any ``eps_model(x_t, t)``: the backbone never sees the schedule (EDM2's separation).
It returns the tensors the vital signs are computed from, so the metrics describe exactly
the step that was taken.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ldmkit.diffusion.schedule import CosineSchedule, add_noise

EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class LossOutput:
    loss: torch.Tensor  # [] mean over batch and elements
    eps_pred: torch.Tensor  # [B, C, h, w]
    eps: torch.Tensor  # [B, C, h, w]


def eps_mse_loss(eps_model: EpsModel, schedule: CosineSchedule, z0: torch.Tensor,
                 t: torch.Tensor, eps: torch.Tensor,
                 target: torch.Tensor | None = None) -> LossOutput:
    """Noise ``z0`` to time ``t`` with ``eps`` and score the model's noise prediction.

    ``target`` (default ``eps``) exists for fault-injection tests of a wrong regression target.
    """
    eps_pred = eps_model(add_noise(schedule, z0, t, eps), t)
    loss = (eps_pred.float() - (eps if target is None else target)).pow(2).mean()
    return LossOutput(loss, eps_pred, eps)
