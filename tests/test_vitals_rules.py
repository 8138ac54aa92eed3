"""Each rule of the guide on synthetic series: raised when it should, silent on noisy healthy runs."""

import math
import random

import pytest

from ldmkit.config import TrainConfig
from ldmkit.config.schedule import lr_at
from ldmkit.vitals import metrics as vm
from ldmkit.vitals.checks import CHECKS
from ldmkit.vitals.diagnose import Context, evaluate, scenario
from ldmkit.vitals.monitor import replay
from ldmkit.vitals.rules import CODES, RULES, THRESHOLDS
from ldmkit.vitals.signs import BY_TAG, SIGNS, TRAIN_TAGS

SCALE = 0.8
TRAIN = TrainConfig(steps=2000, lr=1e-3, warmup_steps=100)


def healthy_series(seed: int = 0, steps: int = 2000, every: int = 50) -> dict:
    """A noisy healthy run (the guide's scenario A), with one-point spikes in several metrics."""
    rng = random.Random(seed)
    s: dict = {tag: [] for tag in TRAIN_TAGS}
    for step in range(every, steps + 1, every):
        progress = step / steps
        s[vm.LOSS].append((step, 0.3 + 0.7 * math.exp(-8 * progress) + rng.gauss(0, 0.03)))
        s[vm.GRAD_NORM].append((step, abs(1.5 + rng.gauss(0, 0.4))))
        s[vm.LEARNING_RATE].append((step, lr_at(step - 1, TRAIN)))
        s[vm.T_MEAN].append((step, 0.5 + rng.gauss(0, 0.03)))
        s[vm.COS_EPS].append((step, 0.7 * (1 - math.exp(-10 * progress)) + rng.gauss(0, 0.03)))
        s[vm.Z_STD].append((step, 0.99 + rng.gauss(0, 0.01)))
    s[vm.GRAD_NORM][10] = (s[vm.GRAD_NORM][10][0], 850.0)  # a single spike
    s[vm.Z_STD][20] = (s[vm.Z_STD][20][0], 0.1)
    s[vm.T_MEAN][15] = (s[vm.T_MEAN][15][0], 0.95)
    target = 1 / SCALE
    for i, step in enumerate(range(500, steps + 1, 500)):
        spread = 1.6 - 0.1 * i  # over-dispersed early, converging
        s.setdefault(vm.PAIRWISE_PREFIX + "mean", []).append((step, 2 * (spread * target) ** 2))
        s.setdefault(vm.PAIRWISE_PREFIX + "min", []).append((step, 0.5))
        s.setdefault(vm.FINAL_PREFIX + "mean", []).append((step, 0.05))
        s.setdefault(vm.FINAL_PREFIX + "std", []).append((step, spread * target))
        s.setdefault(vm.FINAL_PREFIX + "max", []).append((step, 5.5 * spread * target))
        s.setdefault(vm.FINAL_PREFIX + "min", []).append((step, -5.0 * spread * target))
        s.setdefault(vm.COPY_SHARE, []).append((step, 0.0))
        s.setdefault(vm.NEAREST_PREFIX + "median", []).append((step, 1.3))
    for step in range(0, steps + 1, 250):
        for tag, value in validation_record(step / steps, rng).items():
            s.setdefault(tag, []).append((step, value))
    return s


def validation_record(progress: float, rng: random.Random, gap: float = 0.0,
                      stuck: range = range(0)) -> dict[str, float]:
    """A validation of a healthy run (the digits demo's measured shape: eps-MSE stays high at
    low noise), held-out loss ``gap`` above the training images', buckets in ``stuck`` at ~1."""
    learned = 1 - math.exp(-8 * progress) if progress else 0.0
    final = (0.76, 0.36, 0.2, 0.13, 0.1, 0.08, 0.07, 0.06, 0.05, 0.03)
    buckets = [1.0 if k in stuck else 1 - learned * (1 - f) for k, f in enumerate(final)]
    train = sum(buckets) / len(buckets) * (1 + rng.gauss(0, 0.003))
    record = {vm.VAL_LOSS: train * (1 + gap + rng.gauss(0, 0.003)), vm.VAL_TRAIN_LOSS: train}
    record |= {f"{vm.VAL_PREFIX}loss_t{k}": b * (1 + gap) for k, b in enumerate(buckets)}
    return record


def ctx(**thresholds) -> Context:
    return Context.of(SCALE, thresholds, lr_schedule=lambda s: lr_at(s, TRAIN), lr=TRAIN.lr)


def codes(series: dict, context: Context | None = None) -> dict[str, str]:
    return {f.code: f.severity for f in replay(series, context or ctx())}


def with_values(series: dict, tag: str, fn) -> dict:
    out = {k: list(v) for k, v in series.items()}
    out[tag] = [(s, fn(s, v)) for s, v in out[tag]]
    return out


@pytest.mark.parametrize("seed", range(5))
def test_noisy_healthy_runs_with_spikes_raise_nothing(seed):
    series = healthy_series(seed)
    findings = replay(series, ctx())
    assert findings == []
    assert scenario(findings, series, ctx()) == "healthy"


def test_too_little_to_judge():
    series = {tag: recs[:2] for tag, recs in healthy_series().items()}
    assert scenario(evaluate(series, ctx()), series, ctx()) == "too_early"


def test_every_code_has_one_rule_and_every_threshold_cites_the_guide():
    assert len(CODES) == len(set(CODES)) == len(RULES) > 0
    for rule in RULES:
        assert rule.guide and rule.message and rule.fix
        assert rule.check in CHECKS, rule.code
        assert rule.warning or rule.critical, f"{rule.code} has no severity"
        for level in (rule.warning, rule.critical):
            assert level in (None, "always") or level in THRESHOLDS
    assert all(citation for _, citation in THRESHOLDS.values())


def test_loss_nonfinite_is_critical_at_first_nan_and_quotes_a_lower_lr():
    series = with_values(healthy_series(), vm.LOSS, lambda s, v: float("nan") if s >= 600 else v)
    findings = {f.code: f for f in replay(series, ctx())}
    assert findings["loss_nonfinite"].severity == "critical"
    assert findings["loss_nonfinite"].step == 600
    assert "train.lr = 0.0001" in findings["loss_nonfinite"].fix
    assert scenario(list(findings.values()), series, ctx()) == "diverged"


def test_grad_norm_exploding_needs_a_sustained_rise():
    series = with_values(healthy_series(), vm.GRAD_NORM, lambda s, v: 300.0 if s >= 1000 else v)
    finding = {f.code: f for f in replay(series, ctx())}["grad_norm_exploding"]
    assert finding.severity == "critical" and finding.step == 1100  # median of 5: 3rd record
    assert "0.0001" in finding.fix


def test_grad_norm_vanishing():
    series = with_values(healthy_series(), vm.GRAD_NORM, lambda s, v: 1e-8 if s >= 1000 else v)
    assert codes(series)["grad_norm_vanishing"] == "critical"


def test_loss_stuck_high_waits_for_min_steps_then_quotes_a_higher_lr():
    series = with_values(healthy_series(), vm.LOSS, lambda s, v: 1.0 + (v - 0.3) * 0.01)
    series = with_values(series, vm.COS_EPS, lambda s, v: 0.3)
    findings = {f.code: f for f in replay(series, ctx())}
    assert set(findings) == {"loss_stuck_high"}
    assert findings["loss_stuck_high"].step == 250  # min_steps 200, window of 5 records
    assert "0.01" in findings["loss_stuck_high"].fix


def test_loss_too_low():
    series = with_values(healthy_series(), vm.LOSS, lambda s, v: 0.004 if s > 1000 else v)
    assert codes(series) == {"loss_too_low": "warning"}


def test_lr_mismatch_needs_the_config_and_a_persistent_difference():
    series = with_values(healthy_series(), vm.LEARNING_RATE, lambda s, v: v * 3 if s > 1500 else v)
    assert codes(series)["lr_mismatch"] == "warning"
    assert "lr_mismatch" not in codes(series, Context.of(SCALE))
    one_off = with_values(healthy_series(), vm.LEARNING_RATE, lambda s, v: v * 3 if s == 1500 else v)
    assert "lr_mismatch" not in codes(one_off)


@pytest.mark.parametrize("t_mean, severity", [(0.65, "warning"), (0.9, "critical"),
                                              (0.02, "critical")])
def test_t_mean_biased(t_mean, severity):
    series = with_values(healthy_series(), vm.T_MEAN, lambda s, v: t_mean)
    assert codes(series)["t_mean_biased"] == severity


def test_cos_eps_negative_and_random():
    negative = with_values(healthy_series(), vm.COS_EPS, lambda s, v: -0.4)
    assert codes(negative)["cos_eps_negative"] == "critical"
    random_ = with_values(healthy_series(), vm.COS_EPS, lambda s, v: 0.02 * math.sin(s))
    assert codes(random_)["cos_eps_random"] == "warning"


@pytest.mark.parametrize("z, code, severity", [(0.15, "z_std_low", "critical"),
                                               (0.4, "z_std_low", "warning"),
                                               (3.0, "z_std_high", "warning"),
                                               (9.0, "z_std_high", "critical")])
def test_z_std_with_a_computed_scale_fix(z, code, severity):
    series = with_values(healthy_series(), vm.Z_STD, lambda s, v: z)
    findings = {f.code: f for f in replay(series, ctx())}
    assert findings[code].severity == severity
    assert f"latent_scale_factor = {SCALE / z:.4g}" in findings[code].fix
    assert scenario(list(findings.values()), series, ctx()) == "scale_factor_bug"
    # sample findings are not judged against a scale the training vitals show to be wrong
    assert not {"final_latent_std_off", "mode_collapse"} & set(findings)


def test_scale_fix_without_a_known_scale_is_a_ratio():
    series = with_values(healthy_series(), vm.Z_STD, lambda s, v: 0.2)
    finding = replay(series, Context.of(None))[0]
    assert "multiply diffusion.latent_scale_factor by 5" in finding.fix
    assert finding.remedy.changes == () and not finding.remedy.automatic  # no number to set


def test_mode_collapse_levels_and_trend():
    def collapse(values):
        series = healthy_series()
        steps = [s for s, _ in series[vm.PAIRWISE_PREFIX + "mean"]]
        series[vm.PAIRWISE_PREFIX + "mean"] = list(zip(steps, values, strict=True))
        return codes(series).get("mode_collapse")

    norm = SCALE**2
    assert collapse([2.0 / norm, 1.5 / norm, 1.2 / norm, 1.0 / norm]) is None
    assert collapse([2.0 / norm, 1.0 / norm, 0.3 / norm, 0.15 / norm]) == "warning"  # trend
    assert collapse([2.0 / norm, 1.0 / norm, 0.5 / norm, 0.05 / norm]) == "warning"
    assert collapse([2.0 / norm, 1.0 / norm, 0.5 / norm, 0.005 / norm]) == "critical"


def test_mode_collapse_by_the_share_of_variance_between_samples():
    series = healthy_series()  # share = pairwise / (2 std^2) = 1.0 here
    series[vm.PAIRWISE_PREFIX + "mean"][-1] = (2000, 0.4 * 2 * series[vm.FINAL_PREFIX + "std"][-1][1] ** 2)
    assert "mode_collapse" not in codes(series)
    series[vm.PAIRWISE_PREFIX + "mean"][-1] = (2000, 0.2 * 2 * series[vm.FINAL_PREFIX + "std"][-1][1] ** 2)
    finding = {f.code: f for f in replay(series, ctx())}["mode_collapse"]
    assert finding.severity == "warning" and "20% of the samples' variance" in finding.message


def _set_last_sampling(series, tag, value):
    series[tag][-1] = (series[tag][-1][0], value)
    return series


def test_final_latent_std_off_both_ways():
    target = 1 / SCALE
    high = _set_last_sampling(healthy_series(), vm.FINAL_PREFIX + "std", 6 * target)
    assert codes(high)["final_latent_std_off"] == "critical"
    low = _set_last_sampling(healthy_series(), vm.FINAL_PREFIX + "std", 0.4 * target)
    assert codes(low)["final_latent_std_off"] == "warning"


def test_final_latent_extreme_uses_the_guides_example_scale():
    # the guide's +-3 / +-20 hold at its scale 1.86; at scale 0.8 the limits are 6.98 / 46.5
    warn = _set_last_sampling(healthy_series(), vm.FINAL_PREFIX + "max", 12.0)
    assert codes(warn)["final_latent_extreme"] == "warning"
    crit = _set_last_sampling(healthy_series(), vm.FINAL_PREFIX + "min", -60.0)
    assert codes(crit)["final_latent_extreme"] == "critical"


def _extremes(series, reach: float, data: float | None):
    """The last two samplings reach ``reach`` (no longer improving); ``data``: the encoded
    data's own extreme, logged at step 0 as the loop logs it."""
    highs = series[vm.FINAL_PREFIX + "max"]
    highs[-2], highs[-1] = (highs[-2][0], reach - 0.1), (highs[-1][0], reach)
    if data is not None:
        series[vm.DATA_EXTREME] = [(0, data)]
    return series


def test_samples_are_judged_against_the_datas_own_latent_reach():
    """Heavy-tailed real latents (max |z| 10 where the guide's Gaussian band is 6.98 at this
    scale): samples that reach as far as the data are not unstable; past 1.25x it they are,
    and the message gives both yardsticks. Without the measurement the guide's band holds."""
    assert codes(_extremes(healthy_series(), 9.6, None))["final_latent_extreme"] == "warning"
    assert "final_latent_extreme" not in codes(_extremes(healthy_series(), 9.6, 10.0))
    found = {f.code: f for f in replay(_extremes(healthy_series(), 13.0, 10.0), ctx())}
    message = found["final_latent_extreme"].message
    assert found["final_latent_extreme"].severity == "warning"
    assert "limit 12.5: 1.25 x the encoded data's own extreme 10 is 12.5" in message
    assert "the guide's +-3 at its scale 1.86 is 6.98 here" in message
    # light-tailed data (reach 3) never make the limit stricter than the guide's: 6.9 passes,
    # 9.6 does not
    near = _extremes(healthy_series(), 6.9, 3.0)
    lows = near[vm.FINAL_PREFIX + "min"]
    lows[-2], lows[-1] = (lows[-2][0], -5.0), (lows[-1][0], -5.0)
    assert "final_latent_extreme" not in codes(near)
    light = _extremes(healthy_series(), 9.6, 3.0)
    assert codes(light)["final_latent_extreme"] == "warning"


def _guided(series, guidance: float, std_x: float, extreme: float):
    """A guided sampling at the last sampling step: std ``std_x`` times the target, extremes
    ``extreme``, logged under the ``@cfgG`` tags as the loop logs them."""
    step, target = series[vm.FINAL_PREFIX + "std"][-1][0], 1 / SCALE
    for key, value in (("std", std_x * target), ("max", extreme), ("min", -extreme),
                       ("mean", 0.05)):
        series[vm.guidance_tag(vm.FINAL_PREFIX + key, guidance)] = [(step, value)]
    series[vm.GUIDANCE_SCALE] = [(step, guidance)]
    return series


def test_guided_samples_far_off_are_named_whatever_the_unguided_ones_look_like():
    """The trial's case: unguided extremes just past the warning band (7.2 here, limit 6.98),
    guided std 7.5x its target and extremes past the critical band: guidance, critical."""
    off = _extremes(healthy_series(), 7.2, None)
    found = {f.code: f for f in replay(_guided(off, 50.0, 7.5, 60.0), ctx())}
    assert found["guidance_too_high"].severity == "critical"
    assert "further off than the same model's unguided samples" in \
        found["guidance_too_high"].message
    # guided samples as far off as the unguided ones: the model is at fault, not the guidance
    same = {f.code for f in replay(_guided(_extremes(healthy_series(), 7.2, None), 3.0, 1.2, 8.3),
                                   ctx())}
    assert "guidance_too_high" not in same
    # unguided within the bands, guided off a warning band only: a warning
    within = _set_last_sampling(_set_last_sampling(healthy_series(), vm.FINAL_PREFIX + "max", 5.0),
                                vm.FINAL_PREFIX + "min", -5.0)
    mild = {f.code: f for f in replay(_guided(within, 4.0, 2.5, 5.0), ctx())}
    assert mild["guidance_too_high"].severity == "warning"
    assert "unguided samples are within the guide's bands" in mild["guidance_too_high"].message


def test_a_gradient_norm_nan_at_every_step_is_a_diverged_run_whatever_the_loss():
    """A foreign log whose loss looks healthy but whose grad_norm is NaN at every step: no
    update was finite. One NaN among finite norms is a skipped step, not a divergence."""
    nan_everywhere = with_values(healthy_series(), vm.GRAD_NORM, lambda s, v: math.nan)
    found = {f.code: f for f in replay(nan_everywhere, ctx())}
    assert found["grad_norm_nonfinite"].severity == "critical"
    assert scenario(list(found.values()), nan_everywhere, ctx()) == "diverged"
    one = healthy_series()
    one[vm.GRAD_NORM][-3] = (one[vm.GRAD_NORM][-3][0], math.nan)
    assert "grad_norm_nonfinite" not in codes(one)


def test_final_latent_mean_shift():
    shifted = _set_last_sampling(healthy_series(), vm.FINAL_PREFIX + "mean", 1.5)
    assert codes(shifted)["final_latent_mean_shift"] == "warning"


def test_samples_of_an_untrained_model_are_not_blamed_on_the_sampler():
    series = with_values(healthy_series(), vm.LOSS, lambda s, v: 1.0)
    series = _set_last_sampling(series, vm.FINAL_PREFIX + "std", 20.0)
    assert "final_latent_std_off" not in codes(series)


def test_thresholds_can_be_overridden():
    series = with_values(healthy_series(), vm.GRAD_NORM, lambda s, v: 50.0)
    assert "grad_norm_exploding" not in codes(series)
    assert codes(series, ctx(grad_norm_high=20.0))["grad_norm_exploding"] == "critical"


def test_a_cleared_critical_is_still_reported_offline():
    series = with_values(healthy_series(), vm.LOSS,
                         lambda s, v: float("inf") if s == 600 else v)
    finding = {f.code: f for f in replay(series, ctx())}["loss_nonfinite"]
    assert "cleared by step" in finding.message


def with_validations(series: dict, records: list[dict[str, float]], every: int = 250) -> dict:
    """``series`` whose last validations are replaced by ``records``."""
    out = {k: list(v) for k, v in series.items()}
    last = out[vm.VAL_LOSS][-1][0]
    for i, record in enumerate(reversed(records)):
        step = last - i * every
        for tag, value in record.items():
            out[tag] = [(s, value if s == step else v) for s, v in out[tag]]
    return out


def test_overfitting_by_the_gap_between_held_out_and_training_images():
    rng = random.Random(1)
    sick = with_validations(healthy_series(), [validation_record(p, rng, gap=0.5)
                                               for p in (0.875, 1.0)])
    (finding,) = [f for f in replay(sick, ctx()) if f.code == "overfitting"]
    assert finding.severity == "warning" and "above the same noise on training" in finding.message
    assert scenario([finding], sick, ctx()) == "memorization"
    one = with_validations(healthy_series(), [validation_record(1.0, rng, gap=0.5)])
    assert "overfitting" not in codes(one)  # one validation is not a trend


def test_overfitting_by_a_rising_held_out_loss_names_the_noise_levels():
    rng = random.Random(2)
    base = validation_record(1.0, rng)
    rising = []
    for i, worse in enumerate((0.0, 0.1, 0.2)):
        record = dict(base)
        for k in range(3):  # the least noisy levels lose what they had learned
            record[f"{vm.VAL_PREFIX}loss_t{k}"] *= 1 + worse
        record[vm.VAL_LOSS] = base[vm.VAL_LOSS] * (1 + worse / 3)
        record[vm.VAL_TRAIN_LOSS] = base[vm.VAL_LOSS] * (1 - 0.05 * i)
        rising.append(record)
    (finding,) = [f for f in replay(with_validations(healthy_series(), rising), ctx())
                  if f.code == "overfitting"]
    assert "while the training loss fell" in finding.message
    assert "t in [0.0, 0.3) (low noise: the detail)" in finding.message
    both = [dict(r, **{vm.VAL_TRAIN_LOSS: r[vm.VAL_LOSS]}) for r in rising]  # both get worse
    assert "overfitting" not in codes(with_validations(healthy_series(), both))


def test_validation_stuck_names_the_noise_levels_not_learned():
    rng = random.Random(3)
    stuck = with_validations(healthy_series(), [validation_record(p, rng, stuck=range(5, 10))
                                                for p in (0.875, 1.0)])
    for k in range(2):
        stuck[vm.VAL_LOSS][-1 - k] = (stuck[vm.VAL_LOSS][-1 - k][0], 0.95)
    (finding,) = [f for f in replay(stuck, ctx()) if f.code == "validation_stuck"]
    assert "t in [0.5, 1.0) (high noise: the structure)" in finding.message
    assert finding.severity == "warning"
    early = {k: [(s, v) for s, v in recs if s < 200] for k, recs in stuck.items()}
    assert "validation_stuck" not in codes(early)  # min_steps


def test_memorization_by_the_share_of_samples_copying_a_training_latent():
    sick = with_values(healthy_series(), vm.COPY_SHARE, lambda s, v: 0.75 if s == 2000 else v)
    (finding,) = [f for f in replay(sick, ctx()) if f.code == "memorization"]
    assert "75% of the samples are copies" in finding.message
    assert scenario([finding], sick, ctx()) == "memorization"


def test_memorization_rising_over_three_evaluations():
    rising = healthy_series()
    rising[vm.EVAL_MEMORIZATION] = [(1000, 0.01), (1500, 0.03), (2000, 0.09)]
    (finding,) = [f for f in replay(rising, ctx()) if f.code == "memorization_rising"]
    assert "rose to 9% (from 1%)" in finding.message
    flat = healthy_series()
    flat[vm.EVAL_MEMORIZATION] = [(1000, 0.02), (1500, 0.03), (2000, 0.04)]  # + 0.02 < 0.05
    assert "memorization_rising" not in codes(flat)


def test_loss_rules_read_each_objective_in_its_own_units():
    """Flow's velocity target has variance 2: its healthy loss sits where eps's would be stuck."""
    from ldmkit.config import from_dict
    from ldmkit.run.context import context_of

    flow = context_of(from_dict({"diffusion": {"objective": "flow", "schedule": "linear"}}), SCALE)
    eps = context_of(from_dict({}), SCALE)
    assert flow.loss_scale == 2.0 and eps.loss_scale == 1.0
    series = with_values(healthy_series(), vm.LOSS, lambda s, v: 2 * v + 0.4)  # 2.0 -> ~1.0
    assert "loss_stuck_high" in codes(series, eps)
    assert "loss_stuck_high" not in codes(series, flow)
    weighted = context_of(from_dict({"diffusion": {"loss_weighting": "min_snr"}}), SCALE)
    assert 0 < weighted.loss_scale < 1 and weighted.val_loss_scale == 1.0


def _inside(band) -> float:
    """A value well inside a band (open ends stretched by half)."""
    if band.low is not None and band.high is not None:
        return (band.low + band.high) / 2
    if band.low is None:
        return band.high - 0.5 * abs(band.high)
    return band.low * 1.5 if band.low > 0 else band.low * 0.5


def _judged(tag: str, value: float, context: Context) -> set[str]:
    """The codes a rule on ``tag`` raises when a healthy run's ``tag`` holds ``value``: at every
    log step for a train sign, at its last three samplings (or validations) otherwise, with the
    run's other sample vitals left out (a pairwise MSE alone says nothing of the samples' std)."""
    group = BY_TAG[tag].group
    series = {t: v for t, v in healthy_series().items()
              if group == "train" or t not in BY_TAG or BY_TAG[t].group != group}
    steps = [s for s, _ in series[vm.LOSS]]
    series[tag] = [(s, value) for s in (steps if group == "train" else steps[-3:])]
    return {f.code for f in replay(series, context) if f.severity in ("warning", "critical")
            and RULES_BY_METRIC.get(f.code) == tag}


RULES_BY_METRIC = {rule.code: rule.metric for rule in RULES}


# judged together with other signs, so one sign alone cannot say: the batch's pairwise MSE with
# the samples' std (diversity share), a class's or prompt's with the batch's, the extremes min
# with max
CROSS_SIGN = {vm.PAIRWISE_PREFIX + "mean", vm.LEAST_DIVERSE_MSE, vm.LEAST_DIVERSE_PROMPT_MSE,
              vm.FINAL_PREFIX + "max"}


@pytest.mark.parametrize("tag", sorted({s.tag for s in SIGNS if s.bands(ctx())}
                                       & set(RULES_BY_METRIC.values()) - CROSS_SIGN))
def test_the_bands_the_plots_shade_are_the_ones_the_rules_judge(tag):
    """A vital sign's bands (signs.py, shaded by the report and watch) and its rules (rules.py,
    checks.py) agree: held inside a bad band it raises a finding on that sign, inside its good
    band none. The two cannot drift apart unnoticed."""
    context = ctx()
    for band in BY_TAG[tag].bands(context):
        codes = _judged(tag, _inside(band), context)
        if band.kind == "bad":
            assert codes, f"{tag} at {_inside(band):.3g} is in a bad band; no rule fired"
        else:
            assert not codes, f"{tag} at {_inside(band):.3g} is in its good band; {codes} fired"
