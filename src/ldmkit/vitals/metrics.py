"""The guide's metrics as pure functions of the tensors of a step or a sampling.

Tag names are public API: dashboards, ``ldmkit diagnose`` and users' scripts key on them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS = "loss/total_loss"
GRAD_NORM = "optimization/grad_norm"
LEARNING_RATE = "optimization/learning_rate"
T_MEAN = "diffusion/t_mean"
COS_EPS = "diffusion/cos_eps_mean"
Z_STD = "latent/z_std"
SCALE_FACTOR = "latent/scale_factor"
PAIRWISE_PREFIX = "sample_diversity/pairwise_mse_"
FINAL_PREFIX = "final_latent_stats/"
NONFINITE_STEPS = "optimization/nonfinite_steps"
LR_SCALE = "optimization/lr_scale"  # < 1 after divergence rollbacks
UPDATE_RATIO = "optimization/update_ratio"

TRAIN_TAGS = (LOSS, GRAD_NORM, LEARNING_RATE, T_MEAN, COS_EPS, Z_STD)
# logged as the interval's median instead of its mean: a ratio spans decades, and one
# skipped or warm-up step must not move it
MEDIAN_TAGS = (UPDATE_RATIO,)


def cos_eps_mean(eps_pred: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Cosine of predicted and true noise per sample, averaged (guide: diffusion/cos_eps_mean).

    0 for a random guess, 1 for a perfect one, negative if the model predicts ``-eps``.
    """
    return F.cosine_similarity(eps_pred.flatten(1).float(), eps.flatten(1).float(), dim=1).mean()


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


def sample_vitals(decoder_latents: torch.Tensor) -> dict[str, float]:
    """Both sampling groups for latents in the decoder's space ``[N, C, h, w]``."""
    return {**pairwise_mse_stats(decoder_latents), **final_latent_stats(decoder_latents)}


class StepAccumulator:
    """Sums the per-step vitals on the device (keeps ``MEDIAN_TAGS`` per step); read (one host
    sync) once per ``log_every``."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.kept: dict[str, list[torch.Tensor]] = {}
        self.count = 0

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for tag, value in values.items():
            v = value.detach().float()
            if tag in MEDIAN_TAGS:
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
        """Interval means (medians for ``MEDIAN_TAGS``), then reset."""
        if not self.count:
            return {}
        out = {tag: (s / self.count).item() for tag, s in self.sums.items()}
        out |= {tag: torch.stack(v).median().item() for tag, v in self.kept.items() if v}
        self.sums, self.kept, self.count = {}, {}, 0
        return out
