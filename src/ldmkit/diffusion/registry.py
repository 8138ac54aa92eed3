"""The diffusion package's choices by name: objectives (what the network predicts, written
once) and samplers.

With ``x_t = alpha(t) x0 + sigma(t) eps``, an objective says how the network's output becomes
estimates of x0 and eps, what it regresses onto, how its squared error relates to the x0 error
(for min-SNR weighting, Hang et al. 2023), where its loss starts, which schedules it runs on and
what diffusers and other trainers call it. The parameterization, config validation, export,
the accelerate hook and the diagnosis's loss units read this table; a new objective is one
entry here.

- ``eps``: the noise (Ho et al. 2020). ``x0 = (x - sigma out) / alpha``.
- ``v``: ``v = alpha eps - sigma x0`` (Salimans & Ho 2022) on a VP schedule:
  ``x0 = alpha x - sigma out``, ``eps = sigma x + alpha out``.
- ``x0``: the clean latents. ``eps = (x - alpha out) / sigma``.
- ``flow``: rectified flow on ``x_t = (1 - t) x0 + t eps`` with velocity target ``eps - x0``
  (Liu et al. 2022; Esser et al. 2024): ``x0 = x - t out``, ``eps = x + (1 - t) out``.

No torch import: the config and the CLI validate against these names without loading torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

# (out, x_t, alpha, sigma, t), each broadcast to out's shape -> (x0 estimate, eps estimate)
Estimates = Callable[["Tensor", "Tensor", "Tensor", "Tensor", "Tensor"], tuple["Tensor", "Tensor"]]


@dataclass(frozen=True)
class Objective:
    name: str
    estimates: Estimates
    target: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]  # (x0, eps, alpha, sigma)
    # the objective's squared error over the x0 error, from (snr, t) [B]
    x0_error_factor: Callable[[Tensor, Tensor], Tensor]
    target_power: float  # E[target^2] per element on unit-variance latents: where the loss starts
    schedules: tuple[str, ...]  # the noise paths it is defined on (config diffusion.schedule)
    prediction_type: str | None  # diffusers' name; None: no diffusers scheduler samples it
    aliases: tuple[str, ...] = ()  # other trainers' names (configs, logs)


OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    Objective("eps", lambda out, x, a, s, t: ((x - s * out) / a, out),
              lambda x0, eps, a, s: eps, lambda snr, t: snr, 1.0, ("cosine",), "epsilon"),
    Objective("v", lambda out, x, a, s, t: (a * x - s * out, s * x + a * out),
              lambda x0, eps, a, s: a * eps - s * x0, lambda snr, t: snr + 1, 1.0, ("cosine",),
              "v_prediction"),
    Objective("x0", lambda out, x, a, s, t: (out, (x - a * out) / s),
              lambda x0, eps, a, s: x0, lambda snr, t: snr.new_ones(snr.shape), 1.0,
              ("cosine",), "sample"),
    Objective("flow", lambda out, x, a, s, t: (x - t * out, x + (1 - t) * out),
              lambda x0, eps, a, s: eps - x0,
              lambda snr, t: 1 / t.double().clamp(min=1e-6) ** 2, 2.0, ("linear",), None,
              ("flow_matching", "flow-matching")),
)}
OBJECTIVE_NAMES = tuple(OBJECTIVES)
# every name a config or log may use for an objective -> ldmkit's name
OBJECTIVE_ALIASES = {alias: o.name for o in OBJECTIVES.values()
                     for alias in (o.name, o.prediction_type, *o.aliases) if alias}

# diffusion/samplers.py's run_sampler dispatches each of these
SAMPLERS = ("ddpm", "ddim", "dpmpp_2m", "euler", "heun")
