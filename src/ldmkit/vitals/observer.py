"""``VitalsMonitor``: the guide's vital signs and live diagnosis for any training loop.

Most users already have a loop (diffusers' examples, their own). Handing this object the tensors
each step already has gives the same metrics, logs (``metrics.jsonl``, TensorBoard) and
findings (printed once, ``findings.jsonl``) as ``ldmkit train``, and ``ldmkit diagnose``,
``ldmkit report`` and ``ldmkit watch`` work on its directory. See ``examples/diffusers_loop.py``.

    monitor = VitalsMonitor("runs/mine", latent_scale_factor=vae.config.scaling_factor)
    ...
    monitor.observe_train_step(step, loss, noise_pred, noise, timesteps / 999, latents,
                               grad_norm=grad_norm, lr=scheduler.get_last_lr()[0])
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import torch

from ldmkit.platform.lock import DirLock
from ldmkit.vitals import metrics as vm
from ldmkit.vitals.diagnose import Context, Finding, scenario
from ldmkit.vitals.logs.metrics_jsonl import MetricLogger
from ldmkit.vitals.monitor import LiveMonitor
from ldmkit.vitals.rules import THRESHOLDS
from ldmkit.vitals.signs import StepAccumulator, StepTensors, step_vitals


def normalize_timesteps(timesteps: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """Discrete timesteps ``0..T-1`` (diffusers' schedulers) as ``t`` in [0, 1]."""
    return timesteps.float() / max(num_train_timesteps - 1, 1)


def check_unit_timesteps(t: torch.Tensor) -> None:
    """``t`` must be the noise level in [0, 1]: raw scheduler timesteps (0..999) would read as
    a timestep sampler biased to the end (t_mean_biased) with a fix for the wrong thing."""
    low, high = float(t.min()), float(t.max())
    if low < 0 or high > 1:
        hint = (" (these look like a scheduler's integer timesteps: pass "
                "normalize_timesteps(timesteps, scheduler.config.num_train_timesteps))"
                if high > 1 and float(t.float().frac().abs().max()) == 0 else "")
        raise ValueError(f"t must be the noise level in [0, 1]; got values from {low:g} to "
                         f"{high:g}{hint}")


def hook_context(latent_scale_factor: float | None, thresholds: dict[str, float] | None,
                 log_every: int) -> Context:
    """A hook's arguments checked (before it writes anything) and made the rules' context."""
    unknown = sorted(set(thresholds or {}) - set(THRESHOLDS))
    if unknown:
        raise ValueError(f"unknown threshold '{unknown[0]}'; allowed: {', '.join(THRESHOLDS)}")
    if log_every < 1:
        raise ValueError("log_every must be >= 1")
    return Context.of(latent_scale_factor, thresholds)


class StepVitals:
    """What every hook into another training loop shares: the per-step vitals averaged over
    ``log_every`` steps on the device (read once per interval, so observing costs no host sync
    per step), the sample vitals, and the live findings. A subclass says where values go
    (``_log``); ``live`` is None in a process that does not diagnose."""

    def __init__(self, live: LiveMonitor | None, log_every: int) -> None:
        self.live, self.log_every, self.acc = live, log_every, StepAccumulator()
        self._t_checked = False

    def _log(self, step: int, values: dict[str, float]) -> None:
        raise NotImplementedError

    def observe_train_step(self, step: int, loss: torch.Tensor, eps_pred: torch.Tensor,
                           eps: torch.Tensor, t: torch.Tensor, z: torch.Tensor,
                           grad_norm: torch.Tensor | float | None = None,
                           lr: float | None = None, loss_is_eps_mse: bool = True) -> None:
        """One optimizer step: its loss, predicted and true noise ``[B, ...]``, ``t`` in [0, 1]
        ``[B]``, the scaled clean latents ``z`` fed to the model, the gradient norm before
        clipping and the learning rate. Logged every ``log_every`` steps."""
        if not self._t_checked:  # once: a check per step would sync the device each step
            check_unit_timesteps(t)
            self._t_checked = True
        norm = None if grad_norm is None else torch.as_tensor(grad_norm).detach().float()
        self.acc.add(step_vitals(StepTensors(loss.detach(), eps_pred.detach(), eps.detach(),
                                             t.detach(), z.detach(), norm, loss_is_eps_mse)))
        if step % self.log_every == 0:
            values = self.acc.read()
            if lr is not None:
                values[vm.LEARNING_RATE] = float(lr)
            self._log(step, values)

    def observe_samples(self, step: int, latents: torch.Tensor) -> dict[str, float]:
        """Generated latents as handed to the decoder (divided by the scale), ``[N, ...]``."""
        values = vm.sample_vitals(latents.detach().float().cpu())
        self._log(step, values)
        return values

    @property
    def findings(self) -> list[Finding]:
        """The findings active now, most severe first."""
        return self.live.active() if self.live is not None else []

    @property
    def should_stop(self) -> bool:
        """True once a critical finding was raised with ``on_critical='stop'``."""
        return self.live is not None and self.live.stop_finding is not None


class VitalsMonitor(StepVitals):
    """Measure, log and diagnose a diffusion training loop from the tensors of its steps.

    ``latent_scale_factor`` is the scale the loop multiplies the encoder's latents by (None if
    unknown: the sample checks that need it are skipped). Logs go to ``metrics.jsonl`` and
    TensorBoard in ``log_dir``.
    """

    def __init__(self, log_dir: str | Path, latent_scale_factor: float | None = None,
                 log_every: int = 50, thresholds: dict[str, float] | None = None,
                 tensorboard: bool = True, on_critical: str = "warn",
                 echo: Callable[[str], None] = print) -> None:
        ctx = hook_context(latent_scale_factor, thresholds, log_every)
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        self.lock = DirLock(Path(log_dir), "log directory").acquire()  # one writer, as the CLI's
        try:
            self.logger = MetricLogger(log_dir, tensorboard)
        except BaseException:
            self.lock.release()
            raise
        super().__init__(LiveMonitor(Path(log_dir), ctx, on_critical, echo), log_every)
        self.live.text_sink = self.logger.log_text
        self.logger.observers.append(self.live)
        if latent_scale_factor is not None:
            self.logger.log(0, {vm.SCALE_FACTOR: latent_scale_factor})

    def _log(self, step: int, values: dict[str, float]) -> None:
        self.logger.log(step, values)  # the live monitor observes the logger

    def scenario(self) -> str:
        return scenario(self.findings, self.live.series, self.live.ctx)

    def close(self) -> None:
        self.logger.close()
        self.lock.release()

    def __del__(self) -> None:
        if getattr(self, "lock", None) is not None:
            self.lock.release()  # a monitor dropped without close() frees its directory

    def __enter__(self) -> VitalsMonitor:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
