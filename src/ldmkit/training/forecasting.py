"""The divergence forecast as a callback: every step's loss, gradient norm and (when measured)
update ratio go to ``vitals.forecast.Forecaster``; at each log step the largest attention
logit is measured on the global batch's first samples (``Batch.probe``) and the interval's
highest risk is logged (``optimization/divergence_risk``, ``optimization/attn_logit_max``).
When the risk holds, it raises ``divergence_ahead``; under ``vitals.on_warning: repair`` its
remedy (a tenth of the learning rate, from the current weights) is applied at once, at most
``vitals.max_repairs`` times a run, before any step is lost."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ldmkit.config import Config
from ldmkit.diffusion.parameterization import Parameterization
from ldmkit.models.layers import largest_attention_logit
from ldmkit.run.layout import REPAIR
from ldmkit.training.callbacks import CONTINUE, Callback, Decision, StepEvent
from ldmkit.training.divergence import announce
from ldmkit.training.runtime import Runtime, forward_model, rng_untouched
from ldmkit.training.state import LoopState
from ldmkit.vitals import metrics as vm
from ldmkit.vitals.diagnose import event_finding, retry_lr
from ldmkit.vitals.forecast import UPDATE_RATIO_WILD

ATTENTION_SAMPLES = 8  # of the probe: the logits' maximum needs few, the forward costs


def _why(evidence: dict[str, float]) -> str:
    """The evidence in words: what grew, and by how much."""
    parts = []
    if evidence["grad"] > 0 and evidence["loss"] > 0:
        parts.append(f"the gradient norm x{math.exp(evidence['grad']):.3g} and the loss "
                     f"x{math.exp(evidence['loss']):.3g} their level of the steps before")
    if evidence["update"] > 0:
        parts.append(f"updates move the weights by "
                     f"{UPDATE_RATIO_WILD * 10 ** evidence['update']:.0%} a step")
    if evidence["attention"] > 0:
        parts.append(f"the largest attention logit x{math.exp(evidence['attention']):.3g}")
    return "; ".join(parts) or "the signs add up"


@dataclass
class Forecast(Callback):
    cfg: Config
    rt: Runtime
    model: torch.nn.Module
    param: Parameterization
    logged: dict[str, float] = field(default_factory=dict)  # for the next log record

    def on_step(self, event: StepEvent, state: LoopState) -> Decision:
        vitals, forecaster = event.vitals, state.forecaster
        ratio = float(vitals[vm.UPDATE_RATIO]) if vm.UPDATE_RATIO in vitals else None
        attention = None
        if event.step % self.cfg.train.log_every == 0 or event.step == event.end:
            attention = self._attention_logit(event)
        forecast = forecaster.update(float(vitals[vm.LOSS]), float(vitals[vm.GRAD_NORM]),
                                     ratio, attention)
        if attention is not None:
            self.logged = {vm.DIVERGENCE_RISK: forecaster.interval_risk()}
            if math.isfinite(attention):
                self.logged[vm.ATTN_LOGIT] = attention
        if not forecaster.warning_due():
            return CONTINUE
        ahead = forecast.steps_ahead
        finding = event_finding(
            "divergence_ahead", event.step, forecast.risk, why=_why(forecast.evidence),
            ahead="" if ahead is None else f"; the gradient norm reaches "
            f"{forecaster.limit:g} in about {ahead:.0f} steps at this rate",
            lr=retry_lr(self.cfg.train.lr * state.lr_scale))
        monitor = self.rt.monitor
        repairing = monitor is not None and monitor.mode_for(finding) == "repair"
        if repairing and state.repairs < self.cfg.vitals.max_repairs:
            return Decision("remedy", finding, finding.remedy, by=REPAIR)
        announce(self.rt, finding, event.step)
        return CONTINUE

    def take_logged(self, event: StepEvent, state: LoopState) -> dict[str, float]:
        """What the interval's log record adds (``IntervalLog.extras``)."""
        logged, self.logged = self.logged, {}
        return logged

    def _attention_logit(self, event: StepEvent) -> float:
        """The largest attention logit over the global batch's first samples, the same inputs
        on every rank (so all ranks forecast alike, as one process would). NaN: the model has
        no attention that ldmkit measures (a diffusers backbone)."""
        device = self.rt.device
        n = ATTENTION_SAMPLES
        z, t, eps, cond = event.batch.probe
        z, t, eps = z[:n].to(device), t[:n].to(device), eps[:n].to(device)
        cond = {key: value[:n].to(device) for key, value in cond.items()}
        net = forward_model(self.model, self.rt)
        with rng_untouched(device):
            value = largest_attention_logit(
                self.model, lambda: net(self.param.noised(z, t, eps), t, **cond))
        return math.nan if value is None else value
