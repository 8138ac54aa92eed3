"""The values the rule checks exchange: logged series, a run's context, verdicts, findings."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from ldmkit.vitals.remedy import Remedy
from ldmkit.vitals.rules import Rule, threshold_defaults

Series = dict[str, list[tuple[int, float]]]


@dataclass(frozen=True)
class Finding:
    code: str
    severity: str
    metric: str
    step: int
    value: float
    message: str
    fix: str  # the remedy's text in ldmkit's setting names
    remedy: Remedy | None = None  # what the fix changes, as data (None: an event's finding)
    cleared_at: int | None = None  # a critical of a whole log's replay that no longer holds

    def to_dict(self) -> dict:
        record = {k: v for k, v in asdict(self).items() if k != "remedy"}
        return record | {"remedy": self.remedy.to_dict() if self.remedy else None}


@dataclass
class Context:
    """What the rules need besides the series: thresholds, the latent scale, the configured
    learning rate, and the units of the loss. Built from ldmkit's config by
    ``ldmkit.run.context.context_of``; a foreign loop passes what it knows."""

    thresholds: dict[str, float] = field(default_factory=threshold_defaults)
    latent_scale_factor: float | None = None
    # the configured learning rate of update s (0-based), before rollbacks; and its peak
    lr_schedule: Callable[[int], float] | None = None
    lr: float | None = None
    # where the objective's training / validation loss starts (the guide's thresholds assume
    # eps-prediction's 1.0); Parameterization.untrained_loss
    loss_scale: float = 1.0
    val_loss_scale: float = 1.0
    # "finetune": training starts from trained weights, so a low, flat loss is expected
    regime: str = "pretrain"
    # max |z| of the encoded data (latent/data_max_abs), the samples' extremes' yardstick
    data_latent_extreme: float | None = None
    # a text-conditional run's grid prompts: sample_diversity/least_diverse_prompt indexes them
    prompts: tuple[str, ...] = ()
    # each record is measured on fixed points (``ldmkit probe``), not on one training batch, so
    # one record is judged where a batch's signs need a window of them
    fixed_points: bool = False

    @classmethod
    def of(cls, latent_scale_factor: float | None, thresholds: dict[str, float] | None = None,
           **known: Any) -> Context:
        """The guide's thresholds overridden by ``thresholds``; ``known``: the other fields."""
        return cls({**threshold_defaults(), **(thresholds or {})}, latent_scale_factor, **known)

    def guide_unit(self, tag: str) -> float:
        """What 1 of the guide's loss units (eps-prediction's untrained loss) is in ``tag``."""
        from ldmkit.vitals import metrics as vm

        if tag == vm.LOSS:
            return self.loss_scale
        if tag in (vm.VAL_LOSS, vm.VAL_TRAIN_LOSS):
            return self.val_loss_scale
        return 1.0

    def in_guide_units(self, tag: str, value: float) -> float:
        """A loss in the units the guide's thresholds assume (eps-prediction's: starts at 1)."""
        return value / self.guide_unit(tag)

    def thr(self, name: str) -> float:
        return self.thresholds[name]

    def learn(self, values: dict[str, float] | Series) -> Context:
        """Take what a log says of the run itself (the encoded data's latent extreme) from
        logged ``values`` or a whole series; returns self."""
        from ldmkit.vitals import metrics as vm

        value = values.get(vm.DATA_EXTREME)
        if isinstance(value, list):
            value = value[-1][1] if value else None
        if value is not None and math.isfinite(value) and value > 0:
            self.data_latent_extreme = float(value)
        return self

    def extreme_limits(self) -> tuple[float, float, str]:
        """(warning, critical) limits on the samples' ``|final latents|`` and what they are.
        The guide's +-3 / +-20 hold at its example scale 1.86 and are converted to this one;
        when the encoded data's own extreme was measured, samples may reach
        ``final_extreme_data_margin`` times it: heavy-tailed real latents raise the limit, and
        light-tailed ones never lower it below the guide's (a young model's samples converge
        from over-dispersed, measured on the digits: 12.2, 9.2, 7.4, 6.1 by step 800)."""
        scale = self.latent_scale_factor
        convert = self.thr("guide_example_scale") / scale if scale else 1.0
        guide_warn = self.thr("final_extreme_warning") * convert
        guide_crit = self.thr("final_extreme_critical") * convert
        guide = f"the guide's +-3 at its scale 1.86 is {guide_warn:.3g} here"
        if self.data_latent_extreme is None:
            return guide_warn, guide_crit, guide
        margin = self.thr("final_extreme_data_margin")
        warn = max(guide_warn, margin * self.data_latent_extreme)
        return warn, max(guide_crit, 2 * warn), (
            f"{margin:g} x the encoded data's own extreme {self.data_latent_extreme:.3g} is "
            f"{margin * self.data_latent_extreme:.3g}; {guide}")


@dataclass(frozen=True)
class Verdict:
    """What a check found: the level reached (a threshold name), the value, and format fields."""

    level: str
    value: float
    step: int
    fields: dict = field(default_factory=dict)


Check = Callable[[Rule, Series, Context], "Verdict | None"]


