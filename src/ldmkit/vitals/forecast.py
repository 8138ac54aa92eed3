"""Whether a step is abnormal, and whether the run is heading for a divergence.

One definition of an abnormal step serves the loop's divergence guard (which checkpoint is
healthy) and the rule ``grad_norm_exploding`` (guide: grad_norm "> 100: exploding gradients";
loss "NaN or inf: training has collapsed").

``Forecaster`` warns before that happens. In large-scale training the gradient norm and the
optimizer's update size spike against their recent level several steps before the loss does
(OLMo 2, Groeneveld et al. 2025; ZClip, Kumar et al. 2025, a z-score of the gradient norm), and
attention logits that keep growing come before a transformer's divergence (Wortsman et al.
2023, "Small-scale proxies for large-scale Transformer training instabilities"). Each step it
compares the last few steps with a baseline that lags behind them (the median of the steps
before), so a baseline never learns the divergence it should see; the evidence is:

- ``grad``: the recent gradient norm over its baseline (log ratio);
- ``loss``: the recent loss over its baseline: an update that makes the loss worse;
- ``update``: the relative update ||dw|| / ||w|| above ``UPDATE_RATIO_WILD`` (3 % of the
  weights a step), where Adam's steps are no longer small: a learning rate that diverges
  within steps, before the growths have a baseline;
- ``attention``: the largest attention logit's growth over the last log intervals, which
  multiplies the growth evidence.

The gradient's growth counts only with the loss's (a gradient that grows while the loss falls
is learning, not diverging). ``risk`` is 1 - exp(-evidence); the expected steps to ``limit``
extrapolate the gradient norm's recent exponential growth. The numbers were fitted on digits
runs and are measured in BENCHMARKS.md ("Divergence forecast"). Pure Python on floats: a
foreign loop's per-step log replays it.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field

# an update that moves the weights by 3 % a step: healthy runs here stay below 2e-2 (a DiT
# with adaLN-Zero's small weights at lr 3e-3, no warm-up), every run past it diverged or
# stopped learning (BENCHMARKS.md, "Divergence forecast")
UPDATE_RATIO_WILD = 3e-2
UPDATE_WEIGHT = 4.0  # 2x past it: evidence 1.2, risk 0.7
GRAD_DOUBLED = math.log(2.0)  # the gradient norm's growth that counts at all
GROWTH_WEIGHT = 4.0  # x4 gradient and x1.5 loss: evidence 2.2, risk 0.9


def abnormal_step(applied: bool, grad_norm: float, limit: float) -> bool:
    """A step that was not applied (a non-finite loss or gradient), or whose gradient norm
    before clipping is not below ``limit`` (the ``grad_norm_high`` threshold, the guide's 100)."""
    return not applied or exploding(grad_norm, limit)


def exploding(grad_norm: float, limit: float) -> bool:
    """The guide's "> 100: exploding gradients" (NaN included)."""
    return not grad_norm <= limit


@dataclass(frozen=True)
class Forecast:
    risk: float  # 0 (nothing ahead) .. 1
    steps_ahead: float | None  # expected steps until the gradient norm reaches ``limit``
    evidence: dict[str, float] = field(default_factory=dict)


@dataclass
class Forecaster:
    """Per-step divergence risk from the loss, the gradient norm and, when measured, the update
    ratio and the largest attention logit (``update``). ``recent`` steps are compared with the
    ``baseline`` steps before them; nothing is judged before ``baseline // 2`` steps. A warning
    is due when the risk stays at ``threshold`` for ``steps`` steps in a row, once until the
    risk falls back below half of it. Its memory is a few dozen floats, saved in checkpoints
    (``state``/``load``) so that a resumed run forecasts as an uninterrupted one."""

    threshold: float = 0.5
    steps: int = 3
    limit: float = 100.0
    recent: int = 8
    baseline: int = 50
    _loss: deque = field(default_factory=deque, repr=False)
    _grad: deque = field(default_factory=deque, repr=False)
    _ratios: deque = field(default_factory=lambda: deque(maxlen=3), repr=False)
    _attention: deque = field(default_factory=lambda: deque(maxlen=8), repr=False)
    _high_for: int = 0
    _warned: bool = False
    _interval_risk: float = 0.0

    def update(self, loss: float, grad_norm: float, update_ratio: float | None = None,
               attention_logit: float | None = None) -> Forecast:
        keep = self.recent + self.baseline
        for values, value in ((self._loss, loss), (self._grad, grad_norm)):
            if math.isfinite(value) and value > 0:
                values.append(value)
                if len(values) > keep:
                    values.popleft()
        if update_ratio is not None and math.isfinite(update_ratio) and update_ratio > 0:
            self._ratios.append(update_ratio)
        if attention_logit is not None and math.isfinite(attention_logit):
            self._attention.append(attention_logit)
        forecast = self.forecast()
        self._interval_risk = max(self._interval_risk, forecast.risk)
        self._high_for = self._high_for + 1 if forecast.risk >= self.threshold else 0
        if forecast.risk < self.threshold / 2:
            self._warned = False
        return forecast

    def warning_due(self) -> bool:
        """Whether to warn now: the risk has held for ``steps`` steps, not yet warned of."""
        if self._high_for >= self.steps and not self._warned:
            self._warned = True
            return True
        return False

    def interval_risk(self) -> float:
        """The highest risk since the last call (what a log interval records)."""
        risk, self._interval_risk = self._interval_risk, 0.0
        return risk

    def state(self) -> dict:
        return {"loss": list(self._loss), "grad": list(self._grad), "ratios": list(self._ratios),
                "attention": list(self._attention), "high_for": self._high_for,
                "warned": self._warned, "interval_risk": self._interval_risk}

    def load(self, state: dict) -> None:
        self._loss, self._grad = deque(state["loss"]), deque(state["grad"])
        self._ratios.clear()
        self._ratios.extend(state["ratios"])
        self._attention.clear()
        self._attention.extend(state["attention"])
        self._high_for, self._warned = int(state["high_for"]), bool(state["warned"])
        self._interval_risk = float(state["interval_risk"])

    def forecast(self) -> Forecast:
        """The risk now. The update ratio is judged from the first step (it is absolute); the
        growths once ``baseline // 2`` steps give them something to grow from."""
        evidence = {"grad": 0.0, "loss": 0.0, "attention": 0.0,
                    "update": math.log10(statistics.median(self._ratios) / UPDATE_RATIO_WILD)
                    if len(self._ratios) == self._ratios.maxlen else -math.inf}
        if len(self._grad) >= self.recent + self.baseline // 2:
            evidence |= {"grad": _growth(self._grad, self.recent),
                         "loss": _growth(self._loss, self.recent)}
        if len(self._attention) > 1 and self._attention[0] > 0:
            evidence["attention"] = math.log(self._attention[-1] / self._attention[0])
        score = (GROWTH_WEIGHT * max(0.0, evidence["grad"] - GRAD_DOUBLED)
                 * max(0.0, evidence["loss"])
                 * (1.0 + max(0.0, evidence["attention"]))
                 + UPDATE_WEIGHT * max(0.0, evidence["update"]))
        ahead = self._steps_ahead() if len(self._grad) >= 2 * self.recent else None
        return Forecast(1.0 - math.exp(-score), ahead, evidence)

    def _steps_ahead(self) -> float | None:
        """Steps until the gradient norm reaches ``limit`` at its growth over the recent and
        baseline steps (least squares of log norm on step); None when it is not growing."""
        logs = [math.log(g) for g in list(self._grad)[-4 * self.recent:]]
        n = len(logs)
        mean_x, mean_y = (n - 1) / 2, statistics.fmean(logs)
        var = sum((i - mean_x) ** 2 for i in range(n))
        slope = sum((i - mean_x) * (y - mean_y) for i, y in enumerate(logs)) / var
        if slope <= 0:
            return None
        return max(0.0, (math.log(self.limit) - logs[-1]) / slope)


def _growth(values: deque, recent: int) -> float:
    """The mean log of the last ``recent`` values over the log of the median of those before:
    the recent mean counts spikes that come more often, the baseline's median ignores them."""
    items = list(values)
    now = statistics.fmean(math.log(v) for v in items[-recent:])
    return now - math.log(statistics.median(items[:-recent]))
