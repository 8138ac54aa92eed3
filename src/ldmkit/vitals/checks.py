"""The predicates of the rule table (``rules.Rule.check`` names one): each reads a window of
the logged series and returns a ``Verdict`` (the level reached, the value, format fields) or
None. Train metrics are judged with medians or means over ``window`` records; sampling metrics
on the latest sampling; validation metrics on the latest validations.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass

from ldmkit.vitals import metrics as vm
from ldmkit.vitals.context import Check, Context, Series, Verdict
from ldmkit.vitals.forecast import exploding
from ldmkit.vitals.held_out_checks import overfitting, validation_stuck, value_at
from ldmkit.vitals.rules import ALWAYS, RULES, Rule


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
        needed = 1 if ctx.fixed_points else min_records
        if len(recent) < needed or (wait and recent[-1][0] < ctx.thr("min_steps")):
            return None
        value = statistics.median(abs(v) if absolute else v for _, v in recent)
        judged = ctx.in_guide_units(rule.metric, value)
        level = _level(rule, ctx, (lambda t: judged > t) if above else (lambda t: judged < t))
        return Verdict(level, value, recent[-1][0]) if level else None

    return check


def _nonfinite(rule: Rule, series: Series, ctx: Context) -> Verdict | None:
    bad = [(s, v) for s, v in _window(series, rule.metric, ctx) if not math.isfinite(v)]
    return Verdict(ALWAYS, bad[0][1], bad[0][0]) if bad else None


def _all_nonfinite(rule: Rule, series: Series, ctx: Context) -> Verdict | None:
    """Every record of the window (at least 3) non-finite: one NaN gradient is a skipped step
    (``optimization/nonfinite_steps``), a NaN at every step is a diverged run."""
    window = _window(series, rule.metric, ctx)
    if len(window) < 3 or any(math.isfinite(v) for _, v in window):
        return None
    return Verdict(ALWAYS, window[-1][1], window[-1][0])


def _exploding(rule: Rule, series: Series, ctx: Context) -> Verdict | None:
    """The window's median gradient norm is what the divergence guard calls an abnormal step
    (``forecast.exploding``): one definition for the loop and the rule."""
    recent = [(s, v) for s, v in _window(series, rule.metric, ctx) if math.isfinite(v)]
    if len(recent) < 3:
        return None
    value = statistics.median(v for _, v in recent)
    return Verdict(rule.critical, value, recent[-1][0]) \
        if exploding(value, ctx.thr(rule.critical)) else None


def _t_mean(rule: Rule, series: Series, ctx: Context) -> Verdict | None:
    recent = [(s, v) for s, v in _window(series, rule.metric, ctx) if math.isfinite(v)]
    if len(recent) < 3:
        return None
    value = statistics.fmean(v for _, v in recent)
    level = _level(rule, ctx, lambda t: abs(value - 0.5) > t)
    return Verdict(level, value, recent[-1][0]) if level else None


def _lr_mismatch(rule: Rule, series: Series, ctx: Context) -> Verdict | None:
    """The LR logged at step s was used for update s (0-based s - 1) of the configured schedule."""
    if ctx.lr_schedule is None:
        return None
    recent = _window(series, rule.metric, ctx)[-3:]
    tol = ctx.thr("lr_rel_tol")

    scales = series.get(vm.LR_SCALE, [])  # rollbacks multiply the schedule (vitals.on_nonfinite)

    def expected(step: int) -> float:
        factor = next((v for s, v in reversed(scales) if s <= step), 1.0)
        return ctx.lr_schedule(max(step - 1, 0)) * factor

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
    # a conditional model's closest pair is two samples of one class or prompt:
    # class_collapse's or prompt_collapse's
    per_group = [_last(series, least_mse) for _, least_mse, _ in vm.GROUP_TAGS.values()]
    if any(last is not None and last[0] == step for last in per_group):
        mins = []
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
            and ctx.in_guide_units(vm.LOSS, statistics.median(finite)) < ctx.thr("loss_stuck_high")
            and (not cos or statistics.median(cos) > ctx.thr("cos_eps_random")))


def samples_judgeable(rule: Rule, series: Series, ctx: Context) -> bool:
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
    """Against the data's own latent extreme when measured, else the guide's converted band
    (``Context.extreme_limits``)."""
    hi, lo = _last(series, vm.FINAL_PREFIX + "max"), _last(series, vm.FINAL_PREFIX + "min")
    if hi is None or lo is None:
        return None
    value = max(abs(hi[1]), abs(lo[1]))
    warn, crit, basis = ctx.extreme_limits()
    level = rule.critical if value > crit else rule.warning if value > warn else None
    highs, lows = series[vm.FINAL_PREFIX + "max"][-2:], series[vm.FINAL_PREFIX + "min"][-2:]
    level = _settle(rule, level, [max(abs(h), abs(lo)) for (_, h), (_, lo) in zip(highs, lows, strict=False)])
    if level is None:
        return None
    return Verdict(level, value, hi[0], {"limit": crit if level == rule.critical else warn,
                                         "basis": basis})


@dataclass(frozen=True)
class LatentsOff:
    """How far the last final latents (at one guidance scale) are off the bands of
    final_latent_std_off and final_latent_extreme: ``badness`` is the worst multiple of a
    warning band (above 1: off), ``critical`` whether a critical band is passed."""

    badness: float
    critical: bool
    words: str  # what is off ("" when nothing is)


def _latents_off(series: Series, ctx: Context, guidance: float | None) -> LatentsOff | None:
    """The last final latents at ``guidance`` (else unguided) against the bands; None when
    they were not measured."""
    tag = (lambda t: vm.guidance_tag(t, guidance)) if guidance else (lambda t: t)
    std, hi, lo = (_last(series, tag(vm.FINAL_PREFIX + k)) for k in ("std", "max", "min"))
    if std is None or hi is None or lo is None or not ctx.latent_scale_factor:
        return None
    target, warn = 1.0 / ctx.latent_scale_factor, ctx.thr("final_std_ratio_warning")
    limit, critical_limit, _ = ctx.extreme_limits()
    ratio, extreme = std[1] / target, max(abs(hi[1]), abs(lo[1]))
    spread = max(ratio, 1 / ratio) if ratio > 0 else math.inf
    problems = []
    if spread > warn:
        problems.append(f"std {std[1]:.3g}, {ratio:.2f}x the target {target:.3g}")
    if extreme > limit:
        problems.append(f"extremes reach {extreme:.3g}, limit {limit:.3g}")
    return LatentsOff(max(spread / warn, extreme / limit),
                      spread > ctx.thr("final_std_ratio_critical") or extreme > critical_limit,
                      "; ".join(problems))


def _guidance_too_high(rule: Rule, series: Series, ctx: Context) -> Verdict | None:
    """The last guided sampling (``TAG@cfgG``) judged on the bands itself, and against the
    same model's unguided samples: the guidance is at fault when the guided ones are off while
    the unguided are within the bands, or ``guidance_worsening`` times further off than them.
    Critical when a guided value passes a critical band."""
    last = _last(series, rule.metric)
    if last is None or last[1] == 1.0:
        return None
    guided, unguided = _latents_off(series, ctx, last[1]), _latents_off(series, ctx, None)
    if guided is None or not guided.words:
        return None
    if unguided is not None and unguided.words:
        worse = guided.badness / unguided.badness
        if worse < ctx.thr("guidance_worsening"):
            return None  # as far off unguided: the model, which final_latent_* name
        compared = (f"guidance puts them {worse:.1f}x further off than the same model's "
                    f"unguided samples ({unguided.words})")
    else:
        compared = "the same model's unguided samples are within the guide's bands"
    level = rule.critical if guided.critical and rule.critical else rule.warning
    return Verdict(level, last[1], last[0], {"detail": guided.words, "compared": compared})


def _class_collapse(rule: Rule, series: Series, ctx: Context) -> Verdict | None:
    """The least diverse class's (or prompt's) pairwise MSE (normalized units, as mode_collapse
    reads the batch's) under the guide's collapse thresholds while the whole batch's is above
    them; a prompt is named by its text (``Context.prompts``)."""
    lowest, batch = _last(series, rule.metric), _last(series, vm.PAIRWISE_PREFIX + "mean")
    by, (_, _, least) = next((by, tags) for by, tags in vm.GROUP_TAGS.items()
                             if tags[1] == rule.metric)
    which = _last(series, least)
    if lowest is None or batch is None or batch[0] != lowest[0]:
        return None
    norm = (ctx.latent_scale_factor or 1.0) ** 2
    if batch[1] * norm < ctx.thr("pairwise_low_warning"):
        return None  # the whole batch collapsed: mode_collapse's finding
    value = lowest[1] * norm
    level = _level(rule, ctx, lambda t: value < t)
    label = int(which[1]) if which is not None and which[0] == lowest[0] else "?"
    if by == "prompt" and isinstance(label, int):
        label = f"{label}" + (f" {ctx.prompts[label][:80]!r}" if 0 <= label < len(ctx.prompts)
                              else "")
    return Verdict(level, lowest[1], lowest[0], {"label": label, "normalized": value,
                                                 "batch": batch[1] * norm}) if level else None


def _no_update(rule: Rule, series: Series, ctx: Context) -> Verdict | None:
    """Updates of ~0 while the gradient is not vanishing: the optimizer does not apply it (a
    zero learning rate, frozen or foreign parameters). With vanishing gradients the update is
    ~0 too, and ``grad_norm_vanishing`` already names that cause."""
    if CHECKS["median_below"](RULES_BY_CODE["grad_norm_vanishing"], series, ctx):
        return None
    return CHECKS["median_below"](rule, series, ctx)


def _memorization(rule: Rule, series: Series, ctx: Context) -> Verdict | None:
    last = _last(series, rule.metric)
    if last is None or not last[1] >= ctx.thr(rule.warning):
        return None
    return Verdict(rule.warning, last[1], last[0],
                   {"median": value_at(series, vm.NEAREST_PREFIX + "median", last[0]) or 0.0})


def _memorization_rising(rule: Rule, series: Series, ctx: Context) -> Verdict | None:
    """The last three evaluations rising, and by ``memorization_rise`` in all."""
    recent = [(s, v) for s, v in series.get(rule.metric, []) if math.isfinite(v)][-3:]
    if len(recent) < 3:
        return None
    (_, a), (_, b), (step, c) = recent
    if not (a < b < c and c - a >= ctx.thr(rule.warning)):
        return None
    return Verdict(rule.warning, c, step, {"low": a})


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
    "all_nonfinite": _all_nonfinite,
    "exploding": _exploding,
    "no_update": _no_update,
    "validation_stuck": validation_stuck,
    "overfitting": overfitting,
    "memorization": _memorization,
    "memorization_rising": _memorization_rising,
    "guidance_too_high": _guidance_too_high,
    "class_collapse": _class_collapse,  # and prompt_collapse, by its metric
}
RULES_BY_CODE = {rule.code: rule for rule in RULES}

