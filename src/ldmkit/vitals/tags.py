"""The tag names of the guide's vital signs: public API (dashboards, ``ldmkit diagnose`` and
users' scripts key on them), kept apart from the tensor code of ``metrics`` so that reading a
log needs no torch. What each is for, how it is reduced and judged: ``signs.SIGNS``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

LOSS = "loss/total_loss"
GRAD_NORM = "optimization/grad_norm"
LEARNING_RATE = "optimization/learning_rate"
T_MEAN = "diffusion/t_mean"
COS_EPS = "diffusion/cos_eps_mean"
Z_STD = "latent/z_std"
SCALE_FACTOR = "latent/scale_factor"
DATA_EXTREME = "latent/data_max_abs"  # how far the encoded data's own latents reach
PAIRWISE_PREFIX = "sample_diversity/pairwise_mse_"
FINAL_PREFIX = "final_latent_stats/"
NONFINITE_STEPS = "optimization/nonfinite_steps"
LR_SCALE = "optimization/lr_scale"  # < 1 after divergence rollbacks
UPDATE_RATIO = "optimization/update_ratio"
ATTN_LOGIT = "optimization/attn_logit_max"  # the largest attention logit q.k / sqrt(d)
DIVERGENCE_RISK = "optimization/divergence_risk"  # the forecast's (vitals/forecast.py), 0..1
# other trainers' losses that are not one step's: a moving average (kohya's loss/average,
# OneTrainer's smooth_loss) and a per-epoch mean on an epoch axis; shown, never judged per step
LOSS_SMOOTHED = "loss/smoothed"
LOSS_EPOCH = "loss/epoch_average"
EPS_MSE = "loss/eps_mse"  # the implied noise estimate's MSE, when the objective is not eps
# the deterministic validation loss (ldmkit.training.held_out): raw weights, then EMA weights;
# PREFIX + "loss_t{k}" is bucket k of VAL_BUCKETS, t in [k / 10, (k + 1) / 10)
VAL_PREFIX = "validation/"
VAL_EMA_PREFIX = "validation_ema/"
VAL_LOSS = VAL_PREFIX + "loss"
VAL_TRAIN_LOSS = VAL_PREFIX + "train_loss"  # same points on a fixed sample of training images
VAL_BUCKETS = 10
# another trainer's training loss at each of its validations: the median since the one before
# (derived when its log is read), so a rule on a window of records still sees the whole trend
LOSS_BETWEEN_VALIDATIONS = "loss/between_validations"


def val_bucket_tag(k: int, prefix: str = VAL_PREFIX) -> str:
    """The tag of noise-level bucket ``k``: t in [k / VAL_BUCKETS, (k + 1) / VAL_BUCKETS)."""
    return f"{prefix}loss_t{k}"


# another trainer's levels keep their own edges: PREFIX + "loss_t0.22" (one t, as
# diffusion-pipe's quantiles) or "loss_t0.00-0.25" (a range of t)
_LEVEL = re.compile(r"loss_t(?:(\d+)|(\d\.\d+)(?:-(\d\.\d+))?)")


@dataclass(frozen=True)
class NoiseLevel:
    """A validation loss at one noise level: t in [low, high) (low == high: one t), t = 1
    pure noise. ldmkit's ten buckets and other trainers' levels read alike."""

    tag: str
    low: float
    high: float

    @property
    def label(self) -> str:
        return f"t {t_text(self.low)}" + ("" if self.high == self.low else f"-{t_text(self.high)}")


def t_text(t: float) -> str:
    """A level's edge as logged: one decimal for ldmkit's tenths, else two."""
    return f"{t:.1f}" if abs(t * 10 - round(t * 10)) < 1e-9 else f"{t:.2f}"


def level_tag(low: float, high: float | None = None, prefix: str = VAL_PREFIX) -> str:
    """The tag of a level with its own edges (another trainer's), t in [0, 1]."""
    return f"{prefix}loss_t{low:.2f}" + ("" if high is None else f"-{high:.2f}")


def noise_levels_in(tags: Iterable[str], prefix: str = VAL_PREFIX) -> list[NoiseLevel]:
    """The validation levels among ``tags``, least noisy first."""
    levels = []
    for tag in tags:
        match = _LEVEL.fullmatch(tag[len(prefix):]) if tag.startswith(prefix) else None
        if match is None:
            continue
        bucket, low, high = match.groups()
        if bucket is not None:
            levels.append(NoiseLevel(tag, int(bucket) / VAL_BUCKETS,
                                     (int(bucket) + 1) / VAL_BUCKETS))
        else:
            levels.append(NoiseLevel(tag, float(low), float(high or low)))
    return sorted(levels, key=lambda level: (level.low, level.high))


# sample quality (ldmkit.sampling.evaluate): against held-out data, with the in-project classifier
EVAL_PREFIX = "eval/"
EVAL_FD = EVAL_PREFIX + "fd"
EVAL_PRECISION = EVAL_PREFIX + "precision"
EVAL_RECALL = EVAL_PREFIX + "recall"
EVAL_CLASS_COVERAGE = EVAL_PREFIX + "class_coverage"
EVAL_MEMORIZATION = EVAL_PREFIX + "memorization"
EVAL_CLASSIFIER_ACCURACY = EVAL_PREFIX + "classifier_accuracy"
EVAL_CLASS_ACCURACY = EVAL_PREFIX + "class_accuracy"  # class-conditional: asked-for class hit
# text-conditional, with the in-project image-text model (sampling/contrastive.py): the cosine of
# sample and prompt, the share of samples whose prompt ranks first among 32 captions, and both
# on held-out real images with their own captions (the ceiling)
EVAL_CLIP_SCORE = EVAL_PREFIX + "clip_score"
EVAL_PROMPT_RETRIEVAL = EVAL_PREFIX + "prompt_retrieval"
EVAL_CLIP_SCORE_REAL = EVAL_PREFIX + "clip_score_real"
EVAL_PROMPT_RETRIEVAL_REAL = EVAL_PREFIX + "prompt_retrieval_real"
# stage 1 (ldmkit.data.stage1); their own TensorBoard run and rewind stage
VAE_PREFIX = "vae/"
VAE_RECON_MSE = VAE_PREFIX + "recon_mse"
VAE_KL = VAE_PREFIX + "kl"
VAE_PSNR = VAE_PREFIX + "psnr"
NEAREST_PREFIX = "sample_diversity/nearest_train_ratio_"
COPY_SHARE = "sample_diversity/copy_share"
COPY_RATIO = 1 / 3  # nearest / second-nearest training image below this: a copy

COND_GAP = "conditioning/cond_gap"

WITHIN_CLASS = "sample_diversity/within_class_pairwise_mse_mean"
# the class whose samples are most alike, and their pairwise MSE mean
LEAST_DIVERSE_CLASS = "sample_diversity/least_diverse_class"
LEAST_DIVERSE_MSE = "sample_diversity/least_diverse_class_pairwise_mse_mean"
# the same per prompt of a text-conditional model (the index into the run's prompts)
WITHIN_PROMPT = "sample_diversity/within_prompt_pairwise_mse_mean"
LEAST_DIVERSE_PROMPT = "sample_diversity/least_diverse_prompt"
LEAST_DIVERSE_PROMPT_MSE = "sample_diversity/least_diverse_prompt_pairwise_mse_mean"
# per group kind (vitals/metrics.py's within_class_diversity): (within, least diverse's MSE,
# least diverse group)
GROUP_TAGS = {"class": (WITHIN_CLASS, LEAST_DIVERSE_MSE, LEAST_DIVERSE_CLASS),
              "prompt": (WITHIN_PROMPT, LEAST_DIVERSE_PROMPT_MSE, LEAST_DIVERSE_PROMPT)}
GUIDANCE_SCALE = "sampling/guidance_scale"  # logged with the vitals of guided sampling


def guidance_tag(tag: str, guidance: float) -> str:
    """The tag of a sample vital measured at classifier-free guidance ``guidance`` != 1:
    ``final_latent_stats/std@cfg4``."""
    return f"{tag}@cfg{guidance:g}"
