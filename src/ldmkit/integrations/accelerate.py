"""The guide's vital signs in a diffusers / accelerate training loop, logged through
``accelerator.log`` (so they land in whichever tracker the script chose) and diagnosed live.

A diffusers training script already holds every tensor the vital signs need; three lines hand
them over::

    vitals = AccelerateVitals(accelerator, noise_scheduler, vae.config.scaling_factor)
    grad_norm = accelerator.clip_grad_norm_(params, args.max_grad_norm)  # the norm it returns
    vitals.observe(global_step, loss, model_pred, noise, timesteps, latents,
                   noisy_latents=noisy_latents, grad_norm=grad_norm)

The model's output is turned into a noise estimate with the scheduler's ``prediction_type``
(epsilon, v_prediction, sample; a flow-matching scheduler's sigmas), so ``cos_eps`` means the
same as in ldmkit's own runs. Findings are printed once and appended to ``findings.jsonl`` in
the tracker's logging directory; ``ldmkit diagnose`` then reads the tracker's files.
accelerate is not a dependency of ldmkit: this module only calls the object it is handed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ldmkit.diffusion.registry import OBJECTIVE_ALIASES, OBJECTIVES
from ldmkit.platform.lock import DirLock
from ldmkit.vitals import metrics as vm
from ldmkit.vitals.monitor import LiveMonitor
from ldmkit.vitals.observer import StepVitals, hook_context
from ldmkit.vitals.offline import with_objective


class AccelerateVitals(StepVitals):
    """Measure, log (``accelerator.log``) and diagnose one accelerate process's training steps.

    ``latent_scale_factor``: what the loop multiplies the VAE's latents by (None: unknown, the
    sample checks that need it are skipped). Train vitals are averaged over ``log_every`` steps
    on the device and read once per interval. Only the main process logs and diagnoses;
    every process may call ``observe``.
    """

    def __init__(self, accelerator: Any, noise_scheduler: Any,
                 latent_scale_factor: float | None = None, log_every: int = 50,
                 log_dir: str | Path | None = None, thresholds: dict[str, float] | None = None,
                 on_critical: str = "warn", echo: Callable[[str], None] = print) -> None:
        ctx = hook_context(latent_scale_factor, thresholds, log_every)
        config = getattr(noise_scheduler, "config", None)
        if config is None:
            raise ValueError(f"noise_scheduler ({type(noise_scheduler).__name__}) has no "
                             ".config; pass the diffusers scheduler the loop adds noise with")
        setting = (lambda key: config.get(key)) if hasattr(config, "get") else \
            (lambda key: getattr(config, key, None))
        self.prediction_type = str(setting("prediction_type") or "flow_matching")
        if self.prediction_type not in OBJECTIVE_ALIASES:
            raise ValueError(f"prediction_type '{self.prediction_type}' is not one of "
                             f"{', '.join(OBJECTIVE_ALIASES)}; hand eps estimates to "
                             "VitalsMonitor")
        self.objective = OBJECTIVES[OBJECTIVE_ALIASES[self.prediction_type]]
        alphas = getattr(noise_scheduler, "alphas_cumprod", None)
        self.alphas_cumprod = None if alphas is None else torch.as_tensor(alphas).double()
        self.num_train_timesteps = int(setting("num_train_timesteps") or 1000)
        self._checked = False
        self.accelerator = accelerator
        live, self.lock = None, None
        if accelerator.is_main_process:
            directory = Path(log_dir or accelerator.logging_dir or ".")
            directory.mkdir(parents=True, exist_ok=True)
            self.lock = DirLock(directory, "log directory").acquire()  # one writer, as the CLI's
            live = LiveMonitor(directory, with_objective(ctx, self.objective.name),
                               on_critical, echo)
        super().__init__(live, log_every)
        if live is not None and latent_scale_factor is not None:
            self._log(0, {vm.SCALE_FACTOR: float(latent_scale_factor)})

    def eps_estimate(self, model_pred: torch.Tensor, timesteps: torch.Tensor,
                     noisy_latents: torch.Tensor | None,
                     sigmas: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(the noise the prediction implies ``[B, ...]``, t in [0, 1] ``[B]``)."""
        pred = model_pred.detach().float()
        shape = (-1,) + (1,) * (pred.dim() - 1)
        if self.alphas_cumprod is None:  # flow matching: x_t = (1 - s) x0 + s eps
            if sigmas is None:
                raise ValueError("a flow-matching scheduler: pass the sigmas of the batch")
            t = sigmas.detach().float().flatten()
            a, s = 1 - t, t
        else:
            if not self._checked:  # once: a check per step would sync the device each step
                low, high = int(timesteps.min()), int(timesteps.max())
                if low < 0 or high >= len(self.alphas_cumprod):
                    raise ValueError(f"timesteps must be the scheduler's, 0 to "
                                     f"{len(self.alphas_cumprod) - 1}; got {low} to {high}")
                self._checked = True
            acp = self.alphas_cumprod.to(timesteps.device)[timesteps.long()].float()
            a, s = acp.sqrt(), (1 - acp).sqrt().clamp(min=1e-4)
            t = timesteps.float() / max(self.num_train_timesteps - 1, 1)
        if noisy_latents is None and self.objective.name != "eps":
            raise ValueError(f"prediction_type {self.prediction_type}: pass noisy_latents so "
                             "the noise estimate can be formed")
        # the eps objective's noise estimate is its output and does not read x_t
        x_t = pred if noisy_latents is None else noisy_latents.detach().float()
        _, eps = self.objective.estimates(pred, x_t, a.reshape(shape), s.reshape(shape),
                                          t.reshape(shape))
        return eps, t

    def observe(self, step: int, loss: torch.Tensor, model_pred: torch.Tensor,
                noise: torch.Tensor, timesteps: torch.Tensor, latents: torch.Tensor,
                noisy_latents: torch.Tensor | None = None, grad_norm: Any = None,
                lr: float | None = None, sigmas: torch.Tensor | None = None) -> None:
        """One optimizer step: its loss, the model's output, the true noise, the scheduler's
        ``timesteps``, the scaled clean ``latents``, and the gradient norm before clipping
        (``accelerator.clip_grad_norm_``'s return value). Logged every ``log_every`` steps."""
        eps_pred, t = self.eps_estimate(model_pred, timesteps, noisy_latents, sigmas)
        self.observe_train_step(step, loss, eps_pred, noise, t, latents, grad_norm, lr,
                                loss_is_eps_mse=self.objective.name == "eps")

    def _log(self, step: int, values: dict[str, float]) -> None:
        self.accelerator.log(values, step=step)
        if self.live is not None:
            self.live.observe(step, values)

    def close(self) -> None:
        """Release the log directory (also done when the object is collected or the process
        ends), so another writer may take it."""
        if getattr(self, "lock", None) is not None:
            self.lock.release()

    __del__ = close
