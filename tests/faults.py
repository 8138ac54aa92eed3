"""Defects no config can produce, planted through a test-only parameterization (the production
loop knows nothing of them): ``eps_model(model, eps)`` replaces what the loss calls (e.g. a model
that sees the noise), ``wrong_target(target)`` rewrites the regression target (e.g. a sign bug).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ldmkit.diffusion.condition import Cond
from ldmkit.diffusion.parameterization import LossOutput, Net, Parameterization


@dataclass(frozen=True)
class Fault(Parameterization):
    eps_model: Callable[[Net, torch.Tensor], Net] | None = None
    wrong_target: Callable[[torch.Tensor], torch.Tensor] | None = None

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        goal = super().target(x0, eps, t)
        return self.wrong_target(goal) if self.wrong_target else goal

    def loss(self, net: Net, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
             cond: Cond | None = None) -> LossOutput:
        return super().loss(self.eps_model(net, eps) if self.eps_model else net, x0, t, eps, cond)
