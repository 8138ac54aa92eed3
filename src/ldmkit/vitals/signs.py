"""Every vital sign, defined once (the idea of EDM2's ``training_stats``).

An entry is a tag of the guide (``ldm-metrics-guide.md``) with: how one optimizer step computes
it (``step``, from the step's tensors), how the steps of a log interval combine (``interval``),
how DDP ranks combine (``ranks``), the guide's healthy range in words (``healthy``) and the
ranges the rules apply, converted to the run's loss units and latent scale (``bands``). The
trainer's step and its DDP reduction, ``VitalsMonitor``, the interval accumulator, the HTML
report, ``watch`` and the end-of-run summary all read ``SIGNS``; a new vital sign is one entry
here plus its rows in ``rules.py``. Each sign has a group (train, sample, validation, eval,
autoencoder), from which the diagnosis, the report and the guidance sweep take their tag lists.
Nothing here imports the trainer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from ldmkit.vitals import metrics as vm
from ldmkit.vitals.context import Context


@dataclass(frozen=True)
class StepTensors:
    """What one optimizer step hands the vital signs (detached; ``[B, ...]`` unless scalar)."""

    loss: torch.Tensor  # the objective's loss, scalar
    eps_pred: torch.Tensor  # the noise the model implies (Parameterization)
    eps: torch.Tensor  # the true noise
    t: torch.Tensor  # [B] in [0, 1]
    z: torch.Tensor  # the scaled clean latents fed to the model
    grad_norm: torch.Tensor | None = None  # before clipping; the synchronized gradient's
    loss_is_eps_mse: bool = True  # eps objective: loss/eps_mse would repeat the loss


@dataclass(frozen=True)
class Band:
    kind: str  # "good" or "bad"
    low: float | None
    high: float | None


Group = Literal["train", "sample", "validation", "eval", "autoencoder"]


@dataclass(frozen=True)
class VitalSign:
    tag: str
    group: Group
    healthy: str = ""  # the guide's words; empty: not a row of the end-of-run summary
    guide: bool = False  # a row of the guide's tables (the diagnosis lists it when missing)
    step: Callable[[StepTensors], torch.Tensor | None] | None = None  # None: logged elsewhere
    # across ranks: "mean" of equal shards, "pooled_std" (the std of the StepTensors field
    # ``pooled``, from the ranks' moments), "same" (identical on every rank already, e.g. the
    # norm of the all-reduced gradient)
    ranks: Literal["mean", "pooled_std", "same"] = "same"
    pooled: str | None = None
    interval: Literal["mean", "median"] = "mean"  # median: a ratio spanning decades
    bands: Callable[[Context], list[Band]] = lambda ctx: []
    quality: bool = False  # its presence means sample quality was measured (the verdict says so)
    swept: bool = False  # plotted against the guidance scale (``ldmkit eval --guidance``)


def _loss_bands(ctx: Context) -> list[Band]:
    unit, thr = ctx.guide_unit(vm.LOSS), ctx.thr
    return [Band("good", 0.1 * unit, 0.4 * unit), Band("bad", thr("loss_stuck_high") * unit, None),
            Band("bad", None, thr("loss_too_low") * unit)]


def _t_mean_bands(ctx: Context) -> list[Band]:
    warn, crit = ctx.thr("t_mean_dev_warning"), ctx.thr("t_mean_dev_critical")
    return [Band("good", 0.5 - warn, 0.5 + warn), Band("bad", None, 0.5 - crit),
            Band("bad", 0.5 + crit, None)]


def _z_std_bands(ctx: Context) -> list[Band]:
    thr = ctx.thr
    return [Band("good", thr("z_std_low_warning"), thr("z_std_high_warning")),
            Band("bad", None, thr("z_std_low_critical")),
            Band("bad", thr("z_std_high_critical"), None)]


def _pairwise_mean_bands(ctx: Context) -> list[Band]:
    """The guide's thresholds are for unit-variance latents: divided by the scale squared."""
    scale = ctx.latent_scale_factor
    if not scale:
        return []
    return [Band("good", ctx.thr("pairwise_low_warning") / scale**2, None),
            Band("bad", None, ctx.thr("pairwise_low_critical") / scale**2)]


def _final_std_bands(ctx: Context) -> list[Band]:
    scale = ctx.latent_scale_factor
    if not scale:
        return []
    target, warn, crit = (1 / scale, ctx.thr("final_std_ratio_warning"),
                          ctx.thr("final_std_ratio_critical"))
    return [Band("good", target / warn, target * warn), Band("bad", None, target / crit),
            Band("bad", target * crit, None)]


def _final_mean_bands(ctx: Context) -> list[Band]:
    scale = ctx.latent_scale_factor
    limit = ctx.thr("final_mean_shift") / scale if scale else None
    return [Band("good", -limit, limit)] if limit else []


def _final_extreme_bands(ctx: Context) -> list[Band]:
    """The data's own extreme, or the guide's +-3 and +-20 converted (``extreme_limits``)."""
    warn, crit, _ = ctx.extreme_limits()
    return [Band("good", -warn, warn), Band("bad", None, -crit), Band("bad", crit, None)]


def _pairwise(stat: str, healthy: str, bands: Callable[[Context], list[Band]] = lambda c: []
              ) -> VitalSign:
    return VitalSign(vm.PAIRWISE_PREFIX + stat, "sample", healthy, True, bands=bands)


def _train(tag: str, healthy: str, step: Callable[[StepTensors], torch.Tensor | None] | None,
           ranks: Literal["mean", "pooled_std", "same"] = "same", **fields: object) -> VitalSign:
    """A sign of the guide's training-dynamics table, computed from each step's tensors."""
    return VitalSign(tag, "train", healthy, True, step, ranks, **fields)  # type: ignore[arg-type]


def _eval(tag: str, quality: bool = False, swept: bool = False) -> VitalSign:
    return VitalSign(tag, "eval", quality=quality, swept=swept)


SIGNS: tuple[VitalSign, ...] = (
    _train(vm.LOSS, "starts ~1.0, decreases to 0.1-0.4 (x the objective's untrained loss)",
           lambda s: s.loss.float(), "mean", bands=_loss_bands),
    _train(vm.GRAD_NORM, "stable, 0.1-10",
           lambda s: None if s.grad_norm is None else s.grad_norm.float(), "same",
           bands=lambda ctx: [Band("good", 0.1, 10.0), Band("bad", ctx.thr("grad_norm_high"), None),
                              Band("bad", None, ctx.thr("grad_norm_low"))]),
    _train(vm.LEARNING_RATE, "as configured", None),
    _train(vm.T_MEAN, "~0.5 on average", lambda s: s.t.float().mean(), "mean",
           bands=_t_mean_bands),
    _train(vm.COS_EPS, "climbs above 0.5", lambda s: vm.cos_eps_mean(s.eps_pred, s.eps), "mean",
           bands=lambda ctx: [Band("good", 0.5, 1.0), Band("bad", None, ctx.thr("cos_eps_random"))]),
    _train(vm.Z_STD, "~1.0", lambda s: vm.latent_std(s.z), "pooled_std", pooled="z",
           bands=_z_std_bands),
    VitalSign(vm.EPS_MSE, "train", "", False, lambda s: None if s.loss_is_eps_mse else
              (s.eps_pred.float() - s.eps.float()).pow(2).mean(), "mean"),
    VitalSign(vm.UPDATE_RATIO, "train", "well above 1e-8 (weights change)", interval="median",
              bands=lambda ctx: [Band("bad", None, ctx.thr("update_ratio_low"))]),
    VitalSign(vm.ATTN_LOGIT, "train", "steady (growth precedes divergence)"),
    VitalSign(vm.DIVERGENCE_RISK, "train", "near 0 (the forecast of a divergence)",
              interval="median",
              bands=lambda ctx: [Band("good", None, 0.1),
                                 Band("bad", ctx.thr("divergence_risk"), None)]),
    VitalSign(vm.COND_GAP, "train", "well above 0 (the labels or captions move the prediction)",
              bands=lambda ctx: [Band("bad", None, ctx.thr("cond_gap_low"))]),
    VitalSign(vm.VAL_LOSS, "validation", bands=lambda ctx: [
        Band("bad", ctx.thr("val_stuck_high") * ctx.guide_unit(vm.VAL_LOSS), None)]),
    VitalSign(vm.VAL_TRAIN_LOSS, "validation"),
    VitalSign(vm.VAL_EMA_PREFIX + "loss", "validation"),
    VitalSign(vm.VAL_PREFIX + "cos_eps_mean", "validation"),
    _pairwise("mean", "> 0.1 for unit-variance latents", _pairwise_mean_bands),
    _pairwise("std", "non-zero"),
    _pairwise("min", "well above 0"),
    _pairwise("max", "high"),
    VitalSign(vm.WITHIN_CLASS, "sample", "> 0.1 for unit-variance latents, like the batch's",
              bands=_pairwise_mean_bands),
    VitalSign(vm.LEAST_DIVERSE_MSE, "sample",
              "> 0.1 for unit-variance latents: no class collapsed", bands=_pairwise_mean_bands),
    VitalSign(vm.WITHIN_PROMPT, "sample", "> 0.1 for unit-variance latents, like the batch's",
              bands=_pairwise_mean_bands),
    VitalSign(vm.LEAST_DIVERSE_PROMPT_MSE, "sample",
              "> 0.1 for unit-variance latents: no prompt collapsed", bands=_pairwise_mean_bands),
    VitalSign(vm.FINAL_PREFIX + "mean", "sample", "~0.0", True, bands=_final_mean_bands),
    VitalSign(vm.FINAL_PREFIX + "std", "sample", "~1/latent_scale_factor", True,
              bands=_final_std_bands),
    VitalSign(vm.FINAL_PREFIX + "min", "sample", ">= -3 at the guide's scale 1.86", True,
              bands=_final_extreme_bands),
    VitalSign(vm.FINAL_PREFIX + "max", "sample", "<= 3 at the guide's scale 1.86", True,
              bands=_final_extreme_bands),
    VitalSign(vm.COPY_SHARE, "sample",
              bands=lambda ctx: [Band("bad", ctx.thr("copy_share_high"), None)]),
    VitalSign(vm.NEAREST_PREFIX + "median", "sample"),
    VitalSign(vm.VAE_RECON_MSE, "autoencoder"),
    VitalSign(vm.DATA_EXTREME, "autoencoder"),
    VitalSign(vm.VAE_PSNR, "autoencoder"),
    _eval(vm.EVAL_FD, quality=True, swept=True),
    _eval(vm.EVAL_PRECISION, quality=True, swept=True),
    _eval(vm.EVAL_RECALL, quality=True, swept=True),
    _eval(vm.EVAL_CLASS_ACCURACY, swept=True),
    _eval(vm.EVAL_CLASS_COVERAGE),
    _eval(vm.EVAL_MEMORIZATION),
    _eval(vm.EVAL_CLASSIFIER_ACCURACY),
    _eval(vm.EVAL_CLIP_SCORE, swept=True),
    _eval(vm.EVAL_PROMPT_RETRIEVAL, swept=True),
    _eval(vm.EVAL_CLIP_SCORE_REAL),
    _eval(vm.EVAL_PROMPT_RETRIEVAL_REAL),
)
BY_TAG = {sign.tag: sign for sign in SIGNS}
# what every optimizer step logs (given a gradient norm), in the guide's order
TRAIN_TAGS = tuple(s.tag for s in SIGNS if s.step is not None and s.tag != vm.EPS_MSE) + (
    vm.LEARNING_RATE,)
PLOTTED = tuple(s.tag for s in SIGNS)  # the report's and watch's rows, in this order


def tags_of(group: Group) -> tuple[str, ...]:
    return tuple(s.tag for s in SIGNS if s.group == group)


QUALITY_TAGS = tuple(s.tag for s in SIGNS if s.quality)  # the verdict's "sample quality measured"
SWEPT = tuple(s.tag for s in SIGNS if s.swept)  # the report's guidance sweep


def bands(tag: str, ctx: Context) -> list[Band]:
    """Good and bad ranges of ``tag`` as the rules apply them under ``ctx``."""
    sign = BY_TAG.get(tag)
    return sign.bands(ctx) if sign else []


def band_status(value: float, ranges: list[Band]) -> str | None:
    """'bad' inside a bad range, else 'good' inside a good one, 'off' outside every good range;
    None when no range judges the value (what watch colours and the summary marks)."""
    def inside(band: Band) -> bool:
        return (band.low is None or value >= band.low) and (band.high is None or value <= band.high)

    if any(inside(b) for b in ranges if b.kind == "bad"):
        return "bad"
    good = [b for b in ranges if b.kind == "good"]
    if any(inside(b) for b in good):
        return "good"
    return "off" if good else None


def step_vitals(tensors: StepTensors) -> dict[str, torch.Tensor]:
    """Each per-step vital sign of one optimizer step (device tensors, no host sync)."""
    out = {}
    for sign in SIGNS:
        value = sign.step(tensors) if sign.step else None
        if value is not None:
            out[sign.tag] = value.detach()
    return out


def rank_reduced(vitals: dict[str, torch.Tensor], tensors: Mapping[str, torch.Tensor],
                 world: int, all_mean: Callable[[torch.Tensor], torch.Tensor]
                 ) -> dict[str, torch.Tensor]:
    """Per-rank step vitals -> the global batch's, with one ``all_mean`` (the mean over the
    ``world`` ranks of a small float64 vector). Shards are equal, so the mean of per-rank means
    is the global mean; a ``pooled_std`` sign is pooled from the ranks' first two moments of
    ``tensors[sign.pooled]`` (this rank's, by StepTensors field name)."""
    means = [s.tag for s in SIGNS if s.ranks == "mean" and s.tag in vitals]
    pooled = [s for s in SIGNS if s.ranks == "pooled_std" and s.tag in vitals]
    moments = []
    for sign in pooled:
        x = tensors[sign.pooled].detach().double()
        moments += [x.mean(), x.pow(2).mean()]
    reduced = all_mean(torch.stack([*(vitals[t].double() for t in means), *moments]))
    out = {**vitals, **{t: v.float() for t, v in zip(means, reduced[:len(means)], strict=True)}}
    for i, sign in enumerate(pooled):
        mean, square = reduced[len(means) + 2 * i], reduced[len(means) + 2 * i + 1]
        n = world * tensors[sign.pooled].numel()
        out[sign.tag] = ((square - mean * mean) * n / (n - 1)).clamp(min=0).sqrt().float()
    return out


class StepAccumulator:
    """Sums the per-step vitals on the device (keeps each step of an ``interval: median``
    sign); read (one host sync) once per ``log_every``."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.kept: dict[str, list[torch.Tensor]] = {}
        self.count = 0

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for tag, value in values.items():
            v = value.detach().float()
            if tag in BY_TAG and BY_TAG[tag].interval == "median":
                self.kept.setdefault(tag, []).append(v.reshape(()))
            else:
                self.sums[tag] = self.sums[tag] + v if tag in self.sums else v
        self.count += 1

    def state(self) -> tuple[dict[str, torch.Tensor], int]:
        """(tensors, count) of a partial interval, for a checkpoint between two log steps."""
        kept = {f"{tag}#steps": torch.stack(v) for tag, v in self.kept.items() if v}
        return {**self.sums, **kept}, self.count

    def load(self, tensors: dict[str, torch.Tensor], count: int) -> None:
        self.sums = {k: v for k, v in tensors.items() if not k.endswith("#steps")}
        self.kept = {k.removesuffix("#steps"): list(v.unbind()) for k, v in tensors.items()
                     if k.endswith("#steps")}
        self.count = count

    def read(self) -> dict[str, float]:
        """Interval means (medians where the sign says so), then reset."""
        if not self.count:
            return {}
        out = {tag: (s / self.count).item() for tag, s in self.sums.items()}
        out |= {tag: torch.stack(v).median().item() for tag, v in self.kept.items() if v}
        self.sums, self.kept, self.count = {}, {}, 0
        return out
