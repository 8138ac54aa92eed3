"""The values the rule checks exchange: logged series, a run's context, verdicts, findings."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from ldmkit.config import Config, TrainConfig
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
    fix: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Context:
    """What the rules need besides the series: thresholds, the latent scale, the train config."""

    thresholds: dict[str, float] = field(default_factory=threshold_defaults)
    latent_scale_factor: float | None = None
    train: TrainConfig | None = None

    @classmethod
    def of(cls, config: Config | None, latent_scale_factor: float | None,
           thresholds: dict[str, float] | None = None) -> Context:
        """The guide's defaults, overridden by ``config.vitals.thresholds``, then ``thresholds``."""
        merged = {**threshold_defaults(), **(config.vitals.thresholds if config else {}),
                  **(thresholds or {})}
        return cls(merged, latent_scale_factor, config.train if config else None)

    def thr(self, name: str) -> float:
        return self.thresholds[name]


@dataclass(frozen=True)
class Verdict:
    """What a check found: the level reached (a threshold name), the value, and format fields."""

    level: str
    value: float
    step: int
    fields: dict = field(default_factory=dict)


Check = Callable[[Rule, Series, Context], "Verdict | None"]


