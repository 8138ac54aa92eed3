"""The rules' predicates on a validation loss: ldmkit's fixed held-out points
(``ldmkit.training.held_out``) and other trainers' validation losses alike.

A level is a ``metrics.NoiseLevel``: ldmkit's ten buckets of t or another trainer's own edges
(diffusion-pipe's timestep quantiles), so a finding names the noise levels in the terms the
run logged them.
"""

from __future__ import annotations

import math

from ldmkit.vitals import metrics as vm
from ldmkit.vitals.context import Context, Series, Verdict
from ldmkit.vitals.rules import Rule


def value_at(series: Series, tag: str, step: int) -> float | None:
    """``tag``'s value logged at ``step``, or None."""
    return next((v for s, v in reversed(series.get(tag, [])) if s == step), None)


def noise_levels(chosen: list[vm.NoiseLevel], logged: list[vm.NoiseLevel]) -> str:
    """``chosen`` among the ``logged`` levels as ranges of t, and what they hold: the noisiest
    levels decide the structure of an image, the least noisy its detail (guide:
    diffusion/t_mean). Neighbouring ranges are joined; a level at one t is named alone."""
    picked = {level.tag for level in chosen}
    parts, start, end = [], None, None
    for level in logged + [None]:
        joins = level is not None and level.tag in picked and level.high > level.low
        if start is not None and not (joins and math.isclose(level.low, end)):
            parts.append(f"[{vm.t_text(start)}, {vm.t_text(end)})")
            start = None
        if joins and start is None:
            start = level.low
        if joins:
            end = level.high
        elif level is not None and level.tag in picked:
            parts.append(vm.t_text(level.low))
    if len(chosen) == len(logged) and len(parts) > 1:
        return f"every noise level logged (t {vm.t_text(logged[0].low)} to " \
               f"{vm.t_text(logged[-1].high)})"
    high = sum(level.low >= 0.5 for level in chosen)
    meaning = ("every noise level" if len(chosen) == len(logged) else
               "high noise: the structure" if high == len(chosen) else
               "low noise: the detail" if high == 0 else "structure and detail")
    return f"t in {', '.join(parts[:-1]) + ' and ' if len(parts) > 1 else ''}{parts[-1]} " \
           f"({meaning})"


def validation_stuck(rule: Rule, series: Series, ctx: Context) -> Verdict | None:
    """The last two validations after ``min_steps`` above the threshold, naming the noise
    levels that have not learned: the eps-MSE of a healthy model stays high at the least noisy
    levels (0.76 at t < 0.1 on the digits demo), so a level is judged against its own first
    (untrained) validation, not against the threshold."""
    recent = [(s, v) for s, v in series.get(rule.metric, [])
              if s >= ctx.thr("min_steps") and math.isfinite(v)][-2:]
    thr = ctx.thr(rule.warning)
    if len(recent) < 2 or not all(ctx.in_guide_units(rule.metric, v) > thr for _, v in recent):
        return None
    step, value = recent[-1]
    logged = vm.noise_levels_in(series)
    stuck = []
    for level in logged:  # learned: lost a share of its first (untrained) value
        history = series[level.tag]
        now = value_at(series, level.tag, step)
        if history and now is not None and now > (1 - ctx.thr("val_bucket_learned")) * history[0][1]:
            stuck.append(level)
    where = f": not learned at {noise_levels(stuck, logged)}" if stuck else ""
    return Verdict(rule.warning, value, step, {"where": where})


def _training_side(series: Series) -> tuple[dict[int, float], bool]:
    """What the held-out loss is compared with at each validation step, and whether it is the
    same comparison: ldmkit's loss at the same fixed points on training images, or else (another
    trainer's validation) the median training loss since the previous validation, drawn at
    random noise levels, so only its trend can be compared."""
    same = {s: v for s, v in series.get(vm.VAL_TRAIN_LOSS, []) if math.isfinite(v)}
    if same:
        return same, True
    return dict(series.get(vm.LOSS_BETWEEN_VALIDATIONS, [])), False


def overfitting(rule: Rule, series: Series, ctx: Context) -> Verdict | None:
    """Held-out loss well above the training images' loss at the same fixed points (two
    validations running), or rising over three validations while the training loss fell.
    Another trainer's validation is judged by the second test only: its training loss is not
    measured at the validation's points, and a validation set that is the training set falls
    with it, so it never fires from one that is not held out. Names the noise levels whose
    held-out loss rose most from its minimum."""
    val = {s: v for s, v in series.get(vm.VAL_LOSS, []) if math.isfinite(v)}
    train, comparable = _training_side(series)
    steps = [s for s in sorted(val) if s in train and s >= ctx.thr("min_steps") and train[s] > 0]
    if len(steps) < 2:
        return None
    gap = val[steps[-1]] / train[steps[-1]] - 1
    wide = comparable and all(val[s] / train[s] - 1 > ctx.thr("overfit_gap") for s in steps[-2:])
    a, b, c = ([None] * 3 + steps)[-3:]
    step_up = 1 + ctx.thr("overfit_rise") / 4  # each validation clearly above the one before
    rising = a is not None and val[a] * step_up < val[b] and val[b] * step_up < val[c] \
        and train[c] < train[a] and val[c] > (1 + ctx.thr("overfit_rise")) * min(val.values())
    if not (wide or rising):
        return None
    step = steps[-1]
    logged = vm.noise_levels_in(series)
    rise = {}
    for level in logged:
        history = [v for _, v in series[level.tag] if math.isfinite(v)]
        if history and min(history) > 0:
            rise[level] = history[-1] / min(history) - 1
    worst = [level for level, r in rise.items() if r > ctx.thr("overfit_rise")
             and r >= 0.5 * max(rise.values())]
    compared = (f" is {gap:.0%} above the same noise on training images ({train[step]:.3f})"
                if comparable else "")
    rose = f"rose {val[c] / min(val.values()) - 1:.0%} above its minimum while the training " \
           "loss fell" if rising else ""
    return Verdict(rule.warning, val[step], step, {
        "compared": compared, "rising": (", and it " + rose if compared else " " + rose)
        if rising else "",
        "where": f"; held-out loss rose most at {noise_levels(worst, logged)}" if worst else ""})
