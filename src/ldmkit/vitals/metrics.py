"""The guide's metrics as pure functions of the tensors of a step or a sampling.

Their tag names are ``ldmkit.vitals.tags`` (no torch there, so readers of logs need none),
re-exported here: ``metrics.LOSS`` is ``tags.LOSS``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ldmkit.vitals.tags import *  # noqa: F403 (the tags, re-exported)
from ldmkit.vitals.tags import (
    COPY_RATIO,
    COPY_SHARE,
    FINAL_PREFIX,
    GROUP_TAGS,
    NEAREST_PREFIX,
    PAIRWISE_PREFIX,
)


def cos_eps(eps_pred: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Cosine of predicted and true noise per sample ``[B]``."""
    return F.cosine_similarity(eps_pred.flatten(1).float(), eps.flatten(1).float(), dim=1)


def cos_eps_mean(eps_pred: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Cosine of predicted and true noise per sample, averaged (guide: diffusion/cos_eps_mean).

    0 for a random guess, 1 for a perfect one, negative if the model predicts ``-eps``.
    """
    return cos_eps(eps_pred, eps).mean()


COND_GAP_SAMPLES = 32  # the first samples of a log step's global batch it is measured on


def cond_gap(eps_cond: torch.Tensor, eps_uncond: torch.Tensor) -> torch.Tensor:
    """``||eps_c - eps_u|| / ||eps_u||`` over a batch: how much the condition moves a
    conditional model's noise estimate. ~0 means the labels do not reach the model (dropped,
    ``cond_drop_prob`` 1, an embedding that is not connected): guidance then does nothing."""
    diff = (eps_cond.float() - eps_uncond.float()).flatten().norm()
    return diff / eps_uncond.float().flatten().norm().clamp(min=1e-12)


UPDATE_RATIO_SAMPLES = 8  # steps per log interval whose update ratio is measured


def update_ratio_every(log_every: int) -> int:
    """Measure the update ratio every this many steps: about ``UPDATE_RATIO_SAMPLES`` per
    interval, enough for its median, at an eighth of the cost of measuring every step (the
    weights are copied before the update)."""
    return max(1, log_every // UPDATE_RATIO_SAMPLES)


@torch.no_grad()
def update_ratio(before: list[torch.Tensor], after: list[torch.Tensor]) -> torch.Tensor:
    """``||after - before|| / ||before||`` over all parameters: the relative size of the update
    the optimizer applied. Typical healthy values are 1e-4 to 1e-2 per step; ~0 means training
    has no effect (a zero learning rate, frozen or orphaned parameters), which the gradient norm
    alone cannot show. ``before`` is overwritten with the difference (it is a scratch copy)."""
    size = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(before)))
    torch._foreach_sub_(before, after)
    delta = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(before)))
    return (delta / size.clamp(min=1e-12)).float()


def latent_std(z: torch.Tensor) -> torch.Tensor:
    """Std of the scaled latents fed to the model (guide: latent/z_std, must be ~1.0)."""
    return z.float().std()


def pairwise_mse_stats(latents: torch.Tensor, chunk: int = 256) -> dict[str, float]:
    """Mean/std/min/max of the MSE between every pair of samples (guide: sample_diversity).

    Uses ``|a - b|^2 = |a|^2 + |b|^2 - 2 a.b`` on row chunks of the Gram matrix, in float64 so
    identical samples give 0 rather than rounding noise; memory is ``chunk x N``, never N^2.
    """
    x = latents.flatten(1).double()
    n, d = x.shape
    if n < 2:
        raise ValueError("pairwise MSE needs at least two samples")
    sq = x.pow(2).sum(1)
    total = total_sq = 0.0
    lo, hi = float("inf"), float("-inf")
    for start in range(0, n - 1, chunk):
        rows = torch.arange(start, min(start + chunk, n - 1), device=x.device)
        dist = (sq[rows, None] + sq[None, :] - 2.0 * x[rows] @ x.T).clamp(min=0) / d
        upper = dist[torch.arange(n, device=x.device)[None, :] > rows[:, None]]  # pairs i < j
        total += upper.sum().item()
        total_sq += upper.pow(2).sum().item()
        lo, hi = min(lo, upper.min().item()), max(hi, upper.max().item())
    pairs = n * (n - 1) / 2
    mean = total / pairs
    var = max(total_sq / pairs - mean**2, 0.0)
    return {PAIRWISE_PREFIX + "mean": mean, PAIRWISE_PREFIX + "std": var**0.5,
            PAIRWISE_PREFIX + "min": lo, PAIRWISE_PREFIX + "max": hi}


def final_latent_stats(latents: torch.Tensor) -> dict[str, float]:
    """Mean/std/min/max of the latents handed to the decoder, i.e. after dividing by the scale.

    A healthy std is about ``1 / latent_scale_factor`` (guide: final_latent_stats/std).
    """
    x = latents.double()
    return {FINAL_PREFIX + "mean": x.mean().item(), FINAL_PREFIX + "std": x.std().item(),
            FINAL_PREFIX + "min": x.min().item(), FINAL_PREFIX + "max": x.max().item()}


def data_latent_extreme(mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator,
                        chunk: int = 4096) -> float:
    """Largest ``|z|`` over ``z ~ q(z|x)`` of every encoded image ``[N, C, h, w]``, in the
    decoder's units (those of ``final_latent_stats``). The samples' extremes are judged against
    it: the guide's +-3 assumes Gaussian latents, and real ones can be heavy-tailed."""
    top = 0.0
    for start in range(0, len(mean), chunk):
        m, lv = mean[start:start + chunk].float(), logvar[start:start + chunk].float()
        z = m + torch.exp(0.5 * lv) * torch.randn(m.shape, generator=generator)
        top = max(top, z.abs().max().item())
    return top


def within_class_diversity(latents: torch.Tensor, labels: torch.Tensor, by: str = "class"
                           ) -> dict[str, float]:
    """The mean MSE over pairs of samples asked for the same class (the guide's mode collapse
    inside one class, which the whole batch's pairwise MSE hides when classes differ), and the
    class whose samples are most alike; empty when no class has two samples. ``by``
    ``prompt``: the same over the samples of each prompt (different seeds), under the
    ``within_prompt`` tags: an over-trained fine-tune gives one image whatever the seed."""
    total = pairs = 0.0
    lowest: tuple[float, int] | None = None
    for label in labels.unique().tolist():
        group = latents[labels == label]
        if len(group) >= 2:
            n = len(group) * (len(group) - 1) / 2
            mean = pairwise_mse_stats(group)[PAIRWISE_PREFIX + "mean"]
            total, pairs = total + mean * n, pairs + n
            lowest = min(lowest or (mean, label), (mean, label))
    if lowest is None:
        return {}
    within, least_mse, least = GROUP_TAGS[by]
    return {within: total / pairs, least_mse: lowest[0], least: float(lowest[1])}


def sample_vitals(decoder_latents: torch.Tensor, groups: torch.Tensor | None = None,
                  by: str = "class") -> dict[str, float]:
    """Both sampling groups for latents in the decoder's space ``[N, C, h, w]``; with the
    class or prompt (``by``) each sample was asked for, the diversity within each too."""
    out = {**pairwise_mse_stats(decoder_latents), **final_latent_stats(decoder_latents)}
    if groups is not None:
        out |= within_class_diversity(decoder_latents, groups, by)
    return out


COMPARE_SIZE = 32  # images are compared at most this large (area-averaged)


def comparable(images: torch.Tensor) -> torch.Tensor:
    """uint8 or [-1, 1] images ``[N, C, H, W]`` -> float32 pixels in [0, 1] of at most
    ``COMPARE_SIZE`` squared, flattened ``[N, D]``: small enough to hold a reference of 16k."""
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float().add(1) / 2
    if x.shape[-1] > COMPARE_SIZE:
        x = F.adaptive_avg_pool2d(x, COMPARE_SIZE)
    return x.flatten(1)


@torch.no_grad()
def nearest_two_ratio(x: torch.Tensor, ref: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """For each row of ``x [N, D]``: distance to its nearest row of ``ref [M, D]`` over the
    distance to its second nearest ``[N]`` (memory ``chunk x M``)."""
    out = []
    for start in range(0, len(x), chunk):
        two = torch.cdist(x[start:start + chunk], ref).topk(2, largest=False).values
        out.append(two[:, 0] / two[:, 1].clamp(min=1e-12))
    return torch.cat(out)


REFERENCE_MAX = 16384  # training images a sample is compared with (a fixed sample beyond)


@dataclass(frozen=True)
class CopyReference:
    """The training set as the decoder renders it: decoded posterior means, ``comparable``."""

    train: torch.Tensor  # [M, D]

    @classmethod
    @torch.no_grad()
    def of(cls, decode: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor,
           index: torch.Tensor, seed: int = 0) -> CopyReference | None:
        """From the rows ``index`` of unscaled ``latents`` (at most ``REFERENCE_MAX``, a fixed
        sample); None for fewer than two images."""
        if len(index) < 2:
            return None
        if len(index) > REFERENCE_MAX:
            pick = torch.randperm(len(index), generator=torch.Generator().manual_seed(seed))
            index = index[pick[:REFERENCE_MAX].sort().values]
        return cls(torch.cat([comparable(decode(latents[rows].float()).clamp(-1, 1))
                              for rows in index.split(256)]))


def copy_vitals(images: torch.Tensor, reference: CopyReference) -> dict[str, float]:
    """Memorization without a classifier (guide scenario C): for each sample, the distance to
    its nearest training image over that to its second nearest (Yoon et al. 2023, "Diffusion
    probabilistic models generalize when they fail to memorize": a copy when below 1/3). A
    new image sits between training images (ratio ~1: 0.96 median on the digits demo); a copy
    sits on one (0.31 median when 4 images are trained long), and copies of several images
    pass the pairwise test, which only sees copies of one. Compared as the decoder renders
    them: latent distances are dominated by directions the decoder ignores (the same copies
    measured 0.71 in latent space)."""
    ratio = nearest_two_ratio(comparable(images), reference.train)
    return {NEAREST_PREFIX + "median": ratio.median().item(), NEAREST_PREFIX + "min":
            ratio.min().item(), COPY_SHARE: (ratio < COPY_RATIO).float().mean().item()}
