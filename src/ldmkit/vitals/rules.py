"""The guide's bad signs as one table of data (../shared/spec/ldm-metrics-guide.md).

``THRESHOLDS`` holds every number the diagnosis uses, each with the guide row it implements;
``vitals.thresholds`` in the config overrides any of them by name. ``RULES`` lists one row per
finding code: the metric it reads, how a window of records is summarised, which thresholds
make it a warning or critical, and the words shown to the user. The evaluation is in
``ldmkit.vitals.diagnose``; nothing else in the project holds a diagnostic threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

from ldmkit.vitals import tags as vm
from ldmkit.vitals.remedy import RemedySpec

# name -> (default, guide row it implements)
THRESHOLDS: dict[str, tuple[float, str]] = {
    "window": (5, "'stays', 'trending', 'averages over time': judged on the last N records"),
    "min_steps": (200, "'stays ~1.0' / 'stays at 0.0': only after this many optimizer steps"),
    "loss_stuck_high": (0.9, "loss/total_loss bad trend 'Stays ~1.0: model isn't learning'"),
    "loss_too_low": (0.01, "loss/total_loss bad trend '< 0.01: overfitting or data leakage'"),
    "grad_norm_high": (100.0, "optimization/grad_norm '> 100: exploding gradients'"),
    "grad_norm_low": (1e-6, "optimization/grad_norm '< 1e-6: vanishing gradients'"),
    "update_ratio_low": (1e-8, "optimization/grad_norm '< 1e-6: gradients too weak to update "
                         "weights', measured on the update itself: ||delta w|| / ||w|| below this"),
    "lr_rel_tol": (0.01, "learning_rate 'should match the value you set' (relative tolerance)"),
    "t_mean_dev_warning": (0.1, "diffusion/t_mean 'must average ~0.5' (|mean - 0.5| above this)"),
    "t_mean_dev_critical": (0.3, "diffusion/t_mean 'stuck at 0.0 or 1.0: biased sampling'"),
    "cos_eps_random": (0.1, "diffusion/cos_eps_mean 'Stays at 0.0: guessing randomly'"),
    "cos_eps_negative": (-0.05, "diffusion/cos_eps_mean 'Negative: predicting the inverse'"),
    "z_std_low_warning": (0.5, "latent/z_std '<< 1.0 (e.g. 0.1): signal lost in noise'"),
    "z_std_low_critical": (0.2, "latent/z_std scenario B 'Scale factor bug' (z_std 0.15)"),
    "z_std_high_warning": (2.0, "latent/z_std '>> 1.0 (e.g. 5.0): latents too big'"),
    "z_std_high_critical": (5.0, "latent/z_std '>> 1.0 (e.g. 5.0)'"),
    "pairwise_low_warning": (0.1, "pairwise_mse_mean 'for normalized latents > 0.1 is good'"),
    "pairwise_low_critical": (0.01, "pairwise_mse_mean 'Very low (< 0.01): mode collapse'"),
    "pairwise_min_zero": (1e-4, "pairwise_mse_min 'Extremely close to zero'"),
    "pairwise_trend_ratio": (0.1, "pairwise_mse_mean 'trending toward zero' (share of its peak)"),
    "diversity_share": (0.25, "sample_diversity 'same output regardless of noise': pairwise MSE / "
                        "(2 final std^2), the share of variance that differs between samples"),
    "final_mean_shift": (0.5, "final_latent_stats/mean 'close to 0.0' (in target stds)"),
    "final_std_ratio_warning": (2.0, "final_latent_stats/std 'close to 1/latent_scale_factor'"),
    "final_std_ratio_critical": (5.0, "final_latent_stats/std 'very high: sampler unstable'"),
    "final_extreme_warning": (3.0, "final_latent_stats/min,max 'within [-3.0, 3.0]'"),
    "final_extreme_critical": (20.0, "final_latent_stats/min,max 'extreme values (+-20)'"),
    "guide_example_scale": (1.86, "final_latent_stats/std example 'scale factor = 1.86'"),
    "guidance_worsening": (2.0, "final_latent_stats at the guidance scale: guided samples this "
                           "many times further off the bands than the unguided blame guidance"),
    "final_extreme_data_margin": (1.25, "final_latent_stats/min,max 'within [-3, 3]': the "
                                  "band of Gaussian latents; measured data's own reach x this"),
    "val_stuck_high": (0.9, "loss/total_loss 'Stays ~1.0: model isn't learning', judged on the "
                       "deterministic validation loss (no timestep lottery)"),
    "val_bucket_learned": (0.1, "diffusion/t_mean 'some noise levels are barely trained': a "
                           "noise level that lost less than this share of its untrained "
                           "validation loss is not learned"),
    "overfit_gap": (0.25, "loss/total_loss '< 0.01: overfitting': held-out loss above the same "
                    "points' loss on training images by more than this share (measured: 7 % on "
                    "digits, 19 % on emoji at 1500 steps, 34 % and more on 3 images)"),
    "overfit_rise": (0.05, "loss/total_loss 'overfitting': held-out loss risen by this share "
                     "above its minimum over three validations while the training loss fell"),
    "copy_share_high": (0.25, "scenario C 'Memorization': share of samples that are copies "
                        "(nearest training image < 1/3 of the distance to the second nearest)"),
    "memorization_rise": (0.05, "scenario C 'Memorization': eval/memorization (share of samples "
                          "that are near-copies of training images) up by this much over three "
                          "evaluations"),
    "cond_gap_low": (0.01, "diffusion/cos_eps_mean 'Stays at 0.0: model is guessing randomly', "
                     "per condition: conditioning/cond_gap (||eps_c - eps_u|| / ||eps_u||) "
                     "below this after min_steps: the labels do not move the prediction "
                     "(measured: 0 exactly with every label dropped; healthy class-conditional "
                     "digits runs: UNet 0.13 at step 100, 0.20 at 800; DiT 0.07 and 0.21)"),
    "divergence_risk": (0.5, "grad_norm '> 100: exploding gradients', ahead: the forecast's "
                        "risk (vitals/forecast.py) above which divergence_ahead is raised"),
    "divergence_risk_steps": (3, "grad_norm '> 100', ahead: for this many steps in a row (one "
                              "step's spike is not a trend)"),
    "vae_scale_rel_tol": (0.2, "latent/z_std 'Fix: re-calculate latent_scale_factor': a VAE's "
                          "own scaling_factor further than this from the calibrated one"),
}


ALWAYS = "always"


def threshold_defaults() -> dict[str, float]:
    return {name: float(value) for name, (value, _) in THRESHOLDS.items()}


@dataclass(frozen=True)
class Rule:
    """One 'bad sign' row of the guide.

    ``check`` names a predicate in ``ldmkit.vitals.checks.CHECKS``; ``warning`` and
    ``critical`` name thresholds (None: that severity does not exist for this code; ALWAYS: the
    check alone decides).
    ``message`` and ``fix`` are format strings filled with the evaluation's numbers.
    ``about_samples`` rows judge generated samples: they are skipped while the training vitals
    show an untrained or wrong model or a wrong latent scale, which they would only echo.
    """

    code: str
    metric: str
    check: str
    warning: str | None
    critical: str | None
    guide: str
    scenario: str
    message: str
    fix: str
    about_samples: bool = False
    # read when ``metric`` is not logged: a level that a moving average shows as well (another
    # trainer's smoothed loss); never a per-step check
    fallback: str | None = None
    pretrain_only: bool = False  # a fine-tune's low, flat loss is its regime, not this finding
    remedy: RemedySpec = RemedySpec()  # what the fix changes and where training restarts


LR_UP = RemedySpec((("train.lr", "lr_up"),), "latest", automatic=True)
# every step so far trained on latents of the wrong size: start again with the right scale
RESCALE = RemedySpec((("diffusion.latent_scale_factor", "new_scale"),), "start", automatic=True)

# Ordered root causes first: a run's scenario is that of its first warning or critical row.
RULES: tuple[Rule, ...] = (
    Rule("loss_nonfinite", vm.LOSS, "nonfinite", None, ALWAYS, "loss: 'NaN or inf: training has collapsed'",
         "diverged", "the loss became {value} at step {step}: training diverged (exploding updates)",
         "retry from the last good checkpoint with $train.lr = {lr_retry:.4g} (a tenth), keep $grad_clip",
         fallback=vm.LOSS_SMOOTHED,
         remedy=RemedySpec((("train.lr", "lr_retry"),), "healthy", automatic=True)),
    Rule("grad_norm_nonfinite", vm.GRAD_NORM, "all_nonfinite", None, ALWAYS,
         "grad_norm: '> 100: exploding gradients'; loss: 'NaN or inf: training has collapsed'",
         "diverged",
         "the gradient norm is {value} at every one of the last records (through step {step}): "
         "no update is finite, training has diverged whatever the loss shows",
         "retry from the last good checkpoint with $train.lr = {lr_retry:.4g} (a tenth), keep "
         "$grad_clip; check the data for NaN",
         remedy=RemedySpec((("train.lr", "lr_retry"),), "healthy", automatic=True)),
    Rule("grad_norm_exploding", vm.GRAD_NORM, "exploding", None, "grad_norm_high",
         "grad_norm: '> 100: exploding gradients'", "diverged",
         "gradient norm before clipping is {value:.3g} (median of the last records), above {thr:g}: "
         "updates are unstable even if grad_clip hides it",
         "lower $train.lr to {lr_retry:.4g} (a tenth) or lengthen $train.warmup_steps",
         remedy=RemedySpec((("train.lr", "lr_retry"),), "latest", automatic=True)),
    Rule("z_std_low", vm.Z_STD, "median_below", "z_std_low_warning", "z_std_low_critical",
         "latent/z_std: '<< 1.0: latents too small; signal is lost in noise' (scenario B)",
         "scale_factor_bug",
         "latents fed to the model have std {value:.3f}, not ~1.0: they are squashed and look "
         "denoised to the model",
         "{scale_fix}",
         remedy=RESCALE),
    Rule("z_std_high", vm.Z_STD, "median_above", "z_std_high_warning", "z_std_high_critical",
         "latent/z_std: '>> 1.0: latents too big; model can't denoise'", "scale_factor_bug",
         "latents fed to the model have std {value:.3f}, not ~1.0: noise cannot cover them",
         "{scale_fix}",
         remedy=RESCALE),
    Rule("t_mean_biased", vm.T_MEAN, "t_mean", "t_mean_dev_warning", "t_mean_dev_critical",
         "diffusion/t_mean: 'Must average ~0.5 ... stuck at 0.0 or 1.0: biased sampling'",
         "biased_timesteps",
         "sampled timesteps average {value:.3f}, not ~0.5: some noise levels are barely trained",
         "use $diffusion.t_sampling: uniform, or logit_normal with $logit_normal_loc near 0",
         remedy=RemedySpec((("diffusion.t_sampling", "=uniform"),), "latest", automatic=True)),
    Rule("cos_eps_negative", vm.COS_EPS, "median_below", None, "cos_eps_negative",
         "diffusion/cos_eps_mean: 'Negative: predicting the inverse of the noise (severe bug)'",
         "inverted_noise",
         "predicted and true noise point in opposite directions (cosine {value:.3f})",
         "check the sign of the loss target and of the noise in the forward process"),
    Rule("lr_mismatch", vm.LEARNING_RATE, "lr_mismatch", "lr_rel_tol", None,
         "learning_rate: 'Should match the value you set'", "lr_mismatch",
         "the logged learning rate {value:.3g} differs from the configured schedule's {expected:.3g}",
         "check the scheduler and $train.lr / $warmup_steps / $min_lr_ratio; resume with the run's config"),
    Rule("mode_collapse", vm.PAIRWISE_PREFIX + "mean", "mode_collapse", "pairwise_low_warning",
         "pairwise_low_critical",
         "sample_diversity: 'Very low (< 0.01) and trending toward zero ... min close to zero'",
         "mode_collapse",
         "generated samples are nearly identical ({detail}): the model outputs the same image "
         "regardless of the noise",
         "use more data or a smaller model, sample with the EMA weights, train fewer steps",
         about_samples=True),
    Rule("memorization", vm.COPY_SHARE, "memorization", "copy_share_high", None,
         "scenario C: 'Status: Memorization ... Fix: Increase dataset, use EMA, or reduce model "
         "size'", "memorization",
         "{value:.0%} of the samples are copies of training images: each is nearer to one "
         "training image than a third of its distance to the next (median ratio {median:.2f}; "
         "new images sit between training images, ~1)",
         "use more data, the EMA weights, a smaller model or fewer steps",
         about_samples=True),
    Rule("memorization_rising", vm.EVAL_MEMORIZATION, "memorization_rising", "memorization_rise",
         None, "scenario C: 'Status: Memorization ... Fix: Increase dataset, use EMA, or reduce "
         "model size'", "memorization",
         "the share of samples that are near-copies of training images rose to {value:.0%} "
         "(from {low:.0%}) over the last evaluations: the model drifts toward its training set",
         "stop at an earlier checkpoint, or use more data, the EMA weights, a smaller model",
         about_samples=True),
    Rule("loss_too_low", vm.LOSS, "stays_below", "loss_too_low", None,
         "loss/total_loss: '< 0.01: overfitting or data leakage'", "suspicious_loss",
         "the loss is {value:.4f}, below {thr:g}: a noise prediction this good means the model "
         "sees the noise (data leakage) or memorises a tiny dataset",
         "check that the noise is not an input of the model; use more data or a smaller model",
         fallback=vm.LOSS_SMOOTHED, pretrain_only=True),
    Rule("grad_norm_vanishing", vm.GRAD_NORM, "median_below", None, "grad_norm_low",
         "grad_norm: '< 1e-6: vanishing gradients'", "not_learning",
         "gradient norm is {value:.3g}, below {thr:g}: the weights no longer change (dead network)",
         "check that the loss depends on the model output; re-initialise, or raise $train.lr"),
    Rule("no_update", vm.UPDATE_RATIO, "no_update", None, "update_ratio_low",
         "grad_norm: 'Model isn't learning; gradients too weak to update weights'",
         "not_learning",
         "the optimizer changes the weights by {value:.3g} of their size per step: training has "
         "no effect",
         "check that the learning rate is not 0 ($train.lr, warmup, the schedule), that the "
         "parameters require grad and that the optimizer holds the model's parameters"),
    Rule("validation_stuck", vm.VAL_LOSS, "validation_stuck", "val_stuck_high", None,
         "loss/total_loss: 'Stays ~1.0: model isn't learning (check LR)'; which noise levels: "
         "diffusion/t_mean 'some noise levels are barely trained'", "not_learning",
         "the held-out validation loss stays at {value:.3f} after {step} steps{where}",
         "raise $train.lr (now {lr:.3g}) to about {lr_up:.4g}; check the data and latent/z_std",
         remedy=LR_UP),
    Rule("loss_stuck_high", vm.LOSS, "stays_above", "loss_stuck_high", None,
         "loss/total_loss: 'Stays ~1.0: model isn't learning (check LR)'", "not_learning",
         "the loss stays at {value:.3f} after {step} steps: the model is not learning the noise",
         "raise $train.lr (now {lr:.3g}) to about {lr_up:.4g}; check the data and latent/z_std",
         fallback=vm.LOSS_SMOOTHED,
         remedy=LR_UP),
    Rule("cos_eps_random", vm.COS_EPS, "stays_abs_below", "cos_eps_random", None,
         "diffusion/cos_eps_mean: 'Stays at 0.0: model is guessing randomly'", "not_learning",
         "the cosine of predicted and true noise stays at {value:.3f} after {step} steps: "
         "the predictions are random",
         "raise $train.lr (now {lr:.3g}) to about {lr_up:.4g}; check latent/z_std and the data",
         remedy=LR_UP),
    Rule("conditioning_ignored", vm.COND_GAP, "stays_abs_below", "cond_gap_low", None,
         "diffusion/cos_eps_mean: 'Stays at 0.0: model is guessing randomly', applied to the "
         "condition: the prediction does not depend on the labels or captions",
         "conditioning_ignored",
         "the conditional and unconditional noise estimates differ by {value:.3g} of their size "
         "after {step} steps: the class labels or captions do not reach the model, and "
         "guidance will do nothing",
         "check that the data has labels or captions and that $train.cond_drop_prob is well "
         "below 1 (0.1 is usual); in your own loop, pass the condition to the model",
         remedy=RemedySpec((("train.cond_drop_prob", "=0.1"),), "latest", automatic=True)),
    Rule("overfitting", vm.VAL_LOSS, "overfitting", "overfit_gap", None,
         "loss/total_loss: '< 0.01: overfitting'; scenario C 'Memorization ... Increase dataset, "
         "use EMA, or reduce model size'", "memorization",
         "the held-out validation loss {value:.3f}{compared}{rising}: the model fits the "
         "images it trains on, not the data they come from{where}",
         "use more data (or $data.val_fraction to check with more held-out images), fewer steps, "
         "the EMA weights, or a smaller model (a UNet: $model.dropout 0.1)"),
    Rule("class_collapse", vm.LEAST_DIVERSE_MSE, "class_collapse", "pairwise_low_warning",
         "pairwise_low_critical",
         "sample_diversity: 'Very low (< 0.01): mode collapse', per class: the samples of one "
         "class are alike while the batch's, across classes, look diverse", "mode_collapse",
         "the samples of class {label} are nearly identical (pairwise MSE {normalized:.3g} in "
         "normalized units, the whole batch's {batch:.3g}): the model collapsed inside that "
         "class",
         "lower the guidance scale, check that class's training images (few or duplicated), "
         "sample with the EMA weights; more data for that class",
         about_samples=True),
    Rule("prompt_collapse", vm.LEAST_DIVERSE_PROMPT_MSE, "class_collapse",
         "pairwise_low_warning", "pairwise_low_critical",
         "sample_diversity: 'Very low (< 0.01): mode collapse', per prompt: every seed of one "
         "prompt gives the same image while the batch's, across prompts, look diverse",
         "mode_collapse",
         "the samples of prompt {label} are nearly identical across seeds (pairwise MSE "
         "{normalized:.3g} in normalized units, the whole batch's {batch:.3g}): the model "
         "collapsed on that prompt, as an over-trained fine-tune does",
         "keep an earlier checkpoint, lower the guidance scale, train fewer steps or on more "
         "images captioned like that prompt; sample with the EMA weights",
         about_samples=True),
    Rule("guidance_too_high", vm.GUIDANCE_SCALE, "guidance_too_high", "final_std_ratio_warning",
         "final_std_ratio_critical",
         "final_latent_stats/std 'close to 1/latent_scale_factor' and min,max 'within [-3, 3]', "
         "at the guidance scale used, compared with the same model's unguided samples",
         "unstable_sampling",
         "at guidance {value:g} the sampled latents leave the decoder's range ({detail}); "
         "{compared}: the guidance is too strong",
         "sample with a lower --guidance, or guide only part of the noise levels with "
         "$sample.guidance_interval (Kynkaanniemi et al. 2024)",
         about_samples=True),
    Rule("final_latent_std_off", vm.FINAL_PREFIX + "std", "final_std", "final_std_ratio_warning",
         "final_std_ratio_critical",
         "final_latent_stats/std: 'close to 1/latent_scale_factor'", "unstable_sampling",
         "sampled latents have std {value:.3g}, {ratio:.2f}x the target {target:.3g}: "
         "{direction}",
         "{std_fix}",
         about_samples=True),
    Rule("final_latent_extreme", vm.FINAL_PREFIX + "max", "final_extreme", "final_extreme_warning",
         "final_extreme_critical",
         "final_latent_stats/min,max: 'within [-3, 3]; extreme values (+-20): instability'",
         "unstable_sampling",
         "sampled latents reach {value:.3g} (limit {limit:.3g}: {basis}): the sampler is "
         "unstable and images will show artifacts",
         "sample with more steps or DDIM; check latent/z_std; train longer",
         about_samples=True),
    Rule("final_latent_mean_shift", vm.FINAL_PREFIX + "mean", "final_mean", "final_mean_shift",
         None, "final_latent_stats/mean: 'Large shift: latents not centered'", "unstable_sampling",
         "sampled latents have mean {value:.3g} ({units:.2f} target stds from 0): images will be "
         "dull or discoloured",
         "train longer or check latent centring; compare with the encoded data's mean",
         about_samples=True),
)

CODES = tuple(rule.code for rule in RULES)
SEVERITIES = ("info", "warning", "critical")


@dataclass(frozen=True)
class Event:
    """A finding the trainer records when it acts on a bad step, not a rule over a window."""

    code: str
    severity: str
    metric: str
    guide: str
    message: str
    fix: str
    remedy: RemedySpec = RemedySpec()


# vitals.on_nonfinite = rollback | stop (guide: loss 'NaN or inf: training has collapsed,
# likely due to a learning rate that is too high')
EVENTS: dict[str, Event] = {e.code: e for e in (
    Event("divergence_ahead", "warning", vm.DIVERGENCE_RISK,
          "grad_norm: '> 100: exploding gradients', seen coming (vitals/forecast.py)",
          "divergence risk {value:.2f} at step {step}: {why}{ahead}",
          "lower $train.lr to {lr:.4g} (a tenth) now, from the current weights "
          "(vitals.on_warning: repair does it before anything is lost)",
          RemedySpec((("train.lr", "lr"),), "latest", automatic=True)),
    Event("nonfinite_rollback", "warning", vm.LOSS, "loss: 'NaN or inf: training has collapsed'",
          "the loss or gradient was {value} at step {step} (abnormal since step {began}): rolled "
          "back to the checkpoint of step {to} with the learning rate x{lr_scale:.3g} "
          "(rollback {n} of {max})",
          "nothing to do if it does not recur; otherwise lower train.lr (effective now "
          "{lr:.3g}) or lengthen warmup_steps"),
    Event("rollback_exhausted", "critical", vm.LOSS, "loss: 'NaN or inf: training has collapsed'",
          "the loss or gradient was {value} at step {step} after {n} rollbacks: training "
          "diverges even at the learning rate x{lr_scale:.3g}; checkpoints after step {to}, "
          "saved once the divergence had begun (step {began}), moved to checkpoints/diverged",
          "check the data and latent/z_std, then continue from step {to} with "
          "`ldmkit train --resume {run} --set train.lr={lr:.3g}`"),
    # where a non-finite step began (the trainer re-runs that step to find out)
    Event("nonfinite_batch", "critical", vm.LOSS,
          "loss: 'NaN or inf: training has collapsed' / 'could be caused by poor data quality'",
          "the step at {step} was not finite because its batch was: {name} hold non-finite "
          "latents ({precision})",
          "check those images and the latent cache (`ldmkit encode RUN` rebuilds a damaged "
          "cache); a learning rate cannot fix bad data"),
    Event("nonfinite_forward", "critical", vm.LOSS, "loss: 'NaN or inf: training has collapsed'",
          "the step at {step} first went non-finite in the forward pass, in module '{name}' "
          "(finite inputs, non-finite output; {precision})",
          "lower train.lr to {lr:.3g} or lengthen warmup_steps; with bf16 autocast, try "
          "train.precision fp32 to see whether that module overflows in bf16"),
    Event("nonfinite_backward", "critical", vm.LOSS, "loss: 'NaN or inf: training has collapsed'",
          "the step at {step} had a finite loss but a non-finite gradient, first at parameter "
          "{name} ({precision})",
          "lower train.lr to {lr:.3g}, keep grad_clip; with bf16 autocast try "
          "train.precision fp32"),
    Event("nonfinite_unknown", "warning", vm.LOSS, "loss: 'NaN or inf: training has collapsed'",
          "the step at {step} was not finite, but its batch, forward pass and gradients are "
          "finite when run again ({precision}): the fault is outside the model or not "
          "repeatable",
          "check the loss and any custom code around the model; lower train.lr to {lr:.3g}"),
    Event("vae_scale_mismatch", "warning", vm.SCALE_FACTOR,
          "latent/z_std 'Must be ~1.0 ... Fix: re-calculate latent_scale_factor'",
          "the VAE's own scaling_factor {value:.5g} is {off:.0%} off the scale calibrated on this "
          "data ({scale:.4g}): with it, latent/z_std would be {z:.2g} instead of ~1.0",
          "nothing to do here: ldmkit trains with the calibrated {scale:.4g}; to use the VAE "
          "elsewhere, set scaling_factor = {scale:.4g} in its config.json"),
    Event("cfg_without_uncond", "warning", vm.GUIDANCE_SCALE,
          "sample_diversity / final_latent_stats, per condition: guidance extrapolates from an "
          "unconditional prediction the model never learned",
          "sampling with classifier-free guidance {value:g} from a model trained with "
          "train.cond_drop_prob 0: it never learned the unconditional prediction that guidance "
          "extrapolates from, so the guided samples are unpredictable",
          "sample with --guidance 1, or train with train.cond_drop_prob 0.1 (resume with "
          "--set train.cond_drop_prob=0.1 and train further)"),
    Event("nonfinite_stop", "critical", vm.LOSS, "loss: 'NaN or inf: training has collapsed'",
          "the loss or gradient was {value} at step {step} (the step was not applied; abnormal "
          "since step {began}): stopped as vitals.on_nonfinite = stop; checkpoints after step "
          "{to}, saved once the divergence had begun, moved to checkpoints/diverged",
          "continue from step {to} with a lower learning rate: `ldmkit train --resume {run} "
          "--set train.lr={lr:.3g}`, or set vitals.on_nonfinite = rollback"),
)}
