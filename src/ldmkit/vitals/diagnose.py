"""Evaluate the rule table (``ldmkit.vitals.rules``) on logged series: findings and a scenario.

Series are ``{tag: [(step, value), ...]}`` sorted by step. Train metrics are judged over a
window of the last ``window`` records with medians or means, so one noisy point neither raises
nor hides a finding; "stays" rules wait for ``min_steps`` optimizer steps. Sampling metrics are
judged on the latest sampling, each of which already aggregates a whole batch of samples.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from ldmkit.config import Config, TrainConfig
from ldmkit.optim import lr_at
from ldmkit.vitals import metrics as vm
from ldmkit.vitals.rules import ALWAYS, EVENTS, RULES, Rule, threshold_defaults

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


def _window(series: Series, tag: str, ctx: Context) -> list[tuple[int, float]]:
    return series.get(tag, [])[-int(ctx.thr("window")):]


def _level(rule: Rule, ctx: Context, passes: Callable[[float], bool]) -> str | None:
    """The most severe of the rule's levels whose threshold ``passes``."""
    for level in (rule.critical, rule.warning):
        if level and level != ALWAYS and passes(ctx.thr(level)):
            return level
    return None


def _median_check(above: bool, min_records: int = 3, wait: bool = False,
                  absolute: bool = False) -> Check:
    """Median of the window's finite values against the rule's thresholds."""

    def check(rule: Rule, series: Series, ctx: Context) -> Verdict | None:
        recent = [(s, v) for s, v in _window(series, rule.metric, ctx) if math.isfinite(v)]
        if len(recent) < min_records or (wait and recent[-1][0] < ctx.thr("min_steps")):
            return None
        value = statistics.median(abs(v) if absolute else v for _, v in recent)
        level = _level(rule, ctx, (lambda t: value > t) if above else (lambda t: value < t))
        return Verdict(level, value, recent[-1][0]) if level else None

    return check


def _nonfinite(rule: Rule, series: Series, ctx: Context) -> Verdict | None:
    bad = [(s, v) for s, v in _window(series, rule.metric, ctx) if not math.isfinite(v)]
    return Verdict(ALWAYS, bad[0][1], bad[0][0]) if bad else None


def _t_mean(rule: Rule, series: Series, ctx: Context) -> Verdict | None:
    recent = [(s, v) for s, v in _window(series, rule.metric, ctx) if math.isfinite(v)]
    if len(recent) < 3:
        return None
    value = statistics.fmean(v for _, v in recent)
    level = _level(rule, ctx, lambda t: abs(value - 0.5) > t)
    return Verdict(level, value, recent[-1][0]) if level else None


def _lr_mismatch(rule: Rule, series: Series, ctx: Context) -> Verdict | None:
    """The LR logged at step s was used for update s (0-based s - 1) of the configured schedule."""
    if ctx.train is None:
        return None
    recent = _window(series, rule.metric, ctx)[-3:]
    tol = ctx.thr("lr_rel_tol")

    scales = series.get(vm.LR_SCALE, [])  # rollbacks multiply the schedule (vitals.on_nonfinite)

    def expected(step: int) -> float:
        factor = next((v for s, v in reversed(scales) if s <= step), 1.0)
        return lr_at(max(step - 1, 0), ctx.train) * factor

    flags = [abs(v - expected(s)) > tol * expected(s) for s, v in recent]
    if len(recent) < 2 or not flags[-1] or sum(flags) < 2:
        return None
    step, value = recent[-1]
    return Verdict(rule.warning, value, step, {"expected": expected(step)})


def _mode_collapse(rule: Rule, series: Series, ctx: Context) -> Verdict | None:
    """Pairwise MSE in normalized-latent units (x scale^2), as the guide's thresholds assume,
    its share of the samples' variance, its closest pair, and its trend."""
    means = series.get(rule.metric, [])
    if not means:
        return None
    norm = (ctx.latent_scale_factor or 1.0) ** 2
    step, raw = means[-1]
    value = raw * norm
    level = _level(rule, ctx, lambda t: value < t)
    detail = f"pairwise MSE mean {value:.3g} in normalized units"
    mins = series.get(vm.PAIRWISE_PREFIX + "min", [])
    if level is None and mins and mins[-1][1] * norm < ctx.thr("pairwise_min_zero"):
        level, detail = rule.warning, f"the closest pair has MSE {mins[-1][1] * norm:.2g}"
    stds = series.get(vm.FINAL_PREFIX + "std", [])
    if level is None and stds and stds[-1][0] == step and stds[-1][1] > 0:
        # pairwise MSE ~ 2 x between-sample variance; std^2 is the total: scale-free, and
        # ~0.7-0.9 for healthy samples however over-dispersed (measured), -> 0 for one image
        share = raw / (2 * stds[-1][1] ** 2)
        if share < ctx.thr("diversity_share"):
            level, detail = rule.warning, (f"only {share:.0%} of the samples' variance differs "
                                           "between samples")
    values = [v * norm for _, v in means]
    trending = (len(values) >= 3 and values[-1] < values[-2] < values[-3]
                and values[-1] < ctx.thr("pairwise_trend_ratio") * max(values))
    if level is None and trending:
        level, detail = rule.warning, f"pairwise MSE fell to {values[-1]:.3g}, under " \
                                      f"{ctx.thr('pairwise_trend_ratio'):.0%} of its peak"
    return Verdict(level, raw, step, {"detail": detail}) if level else None


def _last(series: Series, tag: str) -> tuple[int, float] | None:
    records = series.get(tag)
    return records[-1] if records else None


def _model_has_learned(series: Series, ctx: Context, step: int) -> bool:
    """Whether sample quality can be blamed on sampling rather than on an untrained model.

    Samples of a model before ``min_steps``, or whose loss still sits at the 'stays ~1.0'
    level, are bad because the model is untrained: loss_stuck_high says that, not the sampler.
    A log without a loss series (sampling only) is judged as it is.
    """
    window = int(ctx.thr("window"))
    loss = [v for s, v in series.get(vm.LOSS, []) if s <= step][-window:]
    if not loss:
        return True
    finite = [v for v in loss if math.isfinite(v)]
    cos = [v for s, v in series.get(vm.COS_EPS, []) if s <= step and math.isfinite(v)][-window:]
    return (step >= ctx.thr("min_steps") and len(finite) == len(loss)
            and statistics.median(finite) < ctx.thr("loss_stuck_high")
            and (not cos or statistics.median(cos) > ctx.thr("cos_eps_random")))


def _samples_judgeable(rule: Rule, series: Series, ctx: Context) -> bool:
    """Samples are judged only from a model that learned, at a right scale (rules.Rule)."""
    last = _last(series, rule.metric)
    return (last is not None and _model_has_learned(series, ctx, last[0])
            and _scale_is_right(series, ctx))


def _scale_is_right(series: Series, ctx: Context) -> bool:
    """False when latent/z_std is outside its warning band: the scale itself is wrong."""
    z = [v for _, v in _window(series, vm.Z_STD, ctx) if math.isfinite(v)]
    if not z:
        return True
    median = statistics.median(z)
    return ctx.thr("z_std_low_warning") <= median <= ctx.thr("z_std_high_warning")


def _settle(rule: Rule, level: str | None, badness: list[float]) -> str | None:
    """Drop a warning while the sample statistic is still improving sampling after sampling.

    Early in a healthy run samples are over-dispersed and converge with training (measured:
    extremes 12.9, 10.5, 9.1, 8.3 at steps 200..800); a warning is for a value that is off and
    no longer getting better, so it needs two samplings. Critical levels are raised at once.
    """
    if level == rule.warning and (len(badness) < 2 or badness[-1] < badness[-2]):
        return None
    return level


def _final_mean(rule: Rule, series: Series, ctx: Context) -> Verdict | None:
    last = _last(series, rule.metric)
    if last is None:
        return None
    units = abs(last[1]) * (ctx.latent_scale_factor or 1.0)
    level = _level(rule, ctx, lambda t: units > t)
    return Verdict(level, last[1], last[0], {"units": units}) if level else None


def _final_std(rule: Rule, series: Series, ctx: Context) -> Verdict | None:
    last = _last(series, rule.metric)
    if last is None or not ctx.latent_scale_factor:
        return None
    target = 1.0 / ctx.latent_scale_factor
    ratio = last[1] / target
    level = _level(rule, ctx, lambda t: not (1.0 / t <= ratio <= t))
    off = [abs(math.log(max(v, 1e-12) / target)) for _, v in series[rule.metric][-2:]]
    level = _settle(rule, level, off)
    if level is None:
        return None
    low = ratio < 1.0
    direction = ("too low: samples are too similar (mode collapse)" if low
                 else "too high: the sampler is unstable or too noisy")
    fix = ("check sample_diversity and mode_collapse; train with more data or EMA" if low else
           "sample with more steps or DDIM (eta=0); check latent/z_std during training")
    return Verdict(level, last[1], last[0], {"ratio": ratio, "target": target,
                                              "direction": direction, "std_fix": fix})


def _final_extreme(rule: Rule, series: Series, ctx: Context) -> Verdict | None:
    """The guide's +-3 / +-20 hold for its example scale (1.86); other scales are converted."""
    hi, lo = _last(series, vm.FINAL_PREFIX + "max"), _last(series, vm.FINAL_PREFIX + "min")
    if hi is None or lo is None:
        return None
    value = max(abs(hi[1]), abs(lo[1]))
    convert = ctx.thr("guide_example_scale") / ctx.latent_scale_factor if ctx.latent_scale_factor else 1.0
    level = _level(rule, ctx, lambda t: value > t * convert)
    highs, lows = series[vm.FINAL_PREFIX + "max"][-2:], series[vm.FINAL_PREFIX + "min"][-2:]
    level = _settle(rule, level, [max(abs(h), abs(lo)) for (_, h), (_, lo) in zip(highs, lows, strict=False)])
    if level is None:
        return None
    return Verdict(level, value, hi[0], {"limit": ctx.thr(level) * convert})


def _no_update(rule: Rule, series: Series, ctx: Context) -> Verdict | None:
    """Updates of ~0 while the gradient is not vanishing: the optimizer does not apply it (a
    zero learning rate, frozen or foreign parameters). With vanishing gradients the update is
    ~0 too, and ``grad_norm_vanishing`` already names that cause."""
    if CHECKS["median_below"](RULES_BY_CODE["grad_norm_vanishing"], series, ctx):
        return None
    return CHECKS["median_below"](rule, series, ctx)


CHECKS: dict[str, Check] = {
    "nonfinite": _nonfinite,
    "median_above": _median_check(above=True),
    "median_below": _median_check(above=False),
    "stays_above": _median_check(above=True, min_records=5, wait=True),
    "stays_below": _median_check(above=False, min_records=5),
    "stays_abs_below": _median_check(above=False, min_records=5, wait=True, absolute=True),
    "t_mean": _t_mean,
    "lr_mismatch": _lr_mismatch,
    "mode_collapse": _mode_collapse,
    "final_mean": _final_mean,
    "final_std": _final_std,
    "final_extreme": _final_extreme,
    "no_update": _no_update,
}
RULES_BY_CODE = {rule.code: rule for rule in RULES}


def _fix_fields(verdict: Verdict, series: Series, ctx: Context) -> dict:
    """Numbers the fixes quote: learning rates to retry with, the scale factor to use."""
    lrs = [v for _, v in series.get(vm.LEARNING_RATE, []) if math.isfinite(v)]
    lr = ctx.train.lr if ctx.train else (max(lrs) if lrs else float("nan"))
    scale, z = ctx.latent_scale_factor, verdict.value
    if not (math.isfinite(z) and z > 0):
        scale_fix = "set diffusion.latent_scale_factor to null so ldmkit calibrates it"
    elif scale:
        scale_fix = (f"set diffusion.latent_scale_factor = {scale / z:.4g} "
                     f"(now {scale:.4g}; current / z_std), or null to calibrate from data")
    else:
        scale_fix = (f"multiply latent_scale_factor by {1 / z:.3g} (1 / z_std), or "
                     "set it to null so ldmkit calibrates it from the data")
    return {"lr": lr, "lr_retry": retry_lr(lr), "lr_up": lr * 10, "scale_fix": scale_fix}


STABLE_LR = 1e-3  # AdamW's step is ~lr per weight; LDM backbones train at 1e-4 to 1e-3


def retry_lr(lr: float) -> float:
    """The learning rate to retry a diverged run with: a tenth, and never above ``STABLE_LR``,
    so that the advice after a wildly wrong rate (1e6) is one that trains."""
    return min(lr / 10, STABLE_LR) if math.isfinite(lr) else STABLE_LR


def evaluate(series: Series, ctx: Context) -> list[Finding]:
    """Findings active at the end of ``series``, most severe first."""
    findings = []
    for rule in RULES:
        if rule.about_samples and not _samples_judgeable(rule, series, ctx):
            continue
        verdict = CHECKS[rule.check](rule, series, ctx)
        if verdict is None:
            continue
        severity = "critical" if verdict.level in (rule.critical, ALWAYS) else "warning"
        fields = {"value": verdict.value, "step": verdict.step,
                  "thr": ctx.thresholds.get(verdict.level, float("nan")),
                  **_fix_fields(verdict, series, ctx), **verdict.fields}
        findings.append(Finding(rule.code, severity, rule.metric, verdict.step, verdict.value,
                                rule.message.format(**fields), rule.fix.format(**fields)))
    return sorted(findings, key=lambda f: f.severity != "critical")


def event_finding(code: str, step: int, value: float, **fields: float) -> Finding:
    """A finding of ``rules.EVENTS``: something the trainer did about a bad step."""
    event = EVENTS[code]
    values = {"value": value, "step": step, **fields}
    return Finding(code, event.severity, event.metric, step, value,
                   event.message.format(**values), event.fix.format(**values))


def scenario(findings: list[Finding], series: Series, ctx: Context) -> str:
    """The guide's scenarios: healthy (A), scale_factor_bug (B), mode_collapse (C), or another."""
    serious = {f.code for f in findings if f.severity in ("warning", "critical")}
    for rule in RULES:  # root causes first
        if rule.code in serious:
            return rule.scenario
    if any(f.code in EVENTS and f.severity == "critical" for f in findings):
        return "diverged"
    if len(series.get(vm.LOSS, [])) < int(ctx.thr("window")):
        return "too_early"
    return "healthy"


QUALITY_TAGS = ("eval/fd", "eval/precision", "eval/recall")


def coverage(scenario_name: str, series: Series) -> str:
    """What a verdict covers, in words: the vital signs judge training dynamics, not whether
    the samples look like the data, so "healthy" says so until an ``eval/*`` figure exists."""
    if scenario_name != "healthy":
        return scenario_name
    measured = [t for t in QUALITY_TAGS if series.get(t)]
    if not measured:
        return "healthy dynamics; sample quality not measured (`ldmkit eval RUN`)"
    figures = ", ".join(f"{t.split('/')[1]} {series[t][-1][1]:.3g}" for t in measured)
    return f"healthy dynamics; sample quality measured at step {series[measured[0]][-1][0]} " \
           f"({figures})"
