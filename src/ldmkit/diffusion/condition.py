"""The condition that travels with a batch, and classifier-free guidance over it.

A condition is a mapping of keyword tensors the backbone takes besides ``(x, t)`` (k-diffusion's
``extra_args``, DiT's ``model_kwargs``), each with the batch as its first dimension:
``labels`` (``[B]`` int64 class indices, ``NULL_LABEL`` for "no class": the unconditional
input that classifier-free guidance needs; Ho & Salimans 2022), ``tokens`` (``[B, L]`` int64
byte tokens of a caption, all padding for the empty caption, which adds nothing in the
built-in text encoder) or a frozen encoder's cached ``context``, ``context_mask`` and
``pooled`` (models/text.py). Everything here chunks, joins and drops conditions key by key.
An empty mapping is the unconditional model's condition; which source makes a condition, and
which a backbone takes, is ``ldmkit.conditioning``'s business.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Cond = dict[str, torch.Tensor]
LABELS = "labels"
NULL_LABEL = -1  # the backbones' label embedding maps it to its extra "no class" row
TOKENS = "tokens"  # its null, all zeros, is the padding of the empty caption
# a frozen encoder's cached states [B, L, D], their mask [B, L] and pooled embedding [B, P];
# the null (zeros, an all-False mask) stands for the encoded empty caption (models/text.py)
CONTEXT, CONTEXT_MASK, POOLED = "context", "context_mask", "pooled"


def chunk(cond: Cond, n: int) -> list[Cond]:
    """``cond`` cut into ``n`` micro-batches along the batch, as ``torch.chunk`` cuts ``x``."""
    parts = {key: value.chunk(n) for key, value in cond.items()}
    return [{key: value[i] for key, value in parts.items()} for i in range(n)] if parts \
        else [{} for _ in range(n)]


def rows(cond: Cond, index: torch.Tensor | slice) -> Cond:
    return {key: value[index] for key, value in cond.items()}


def joined(first: Cond, second: Cond) -> Cond:
    """Two conditions as one batch (first's rows, then second's)."""
    return {key: torch.cat([first[key], second[key]]) for key in first}


def null(cond: Cond) -> Cond:
    """The unconditional input of the same batch: every label the null label, every caption
    the empty one (all padding, zeros: as any other key)."""
    return {key: torch.full_like(value, NULL_LABEL) if key == LABELS else torch.zeros_like(value)
            for key, value in cond.items()}


def dropped(cond: Cond, prob: float, generator: torch.Generator,
            null_of: Callable[[Cond], Cond] | None = None) -> Cond:
    """Each sample's condition replaced by the null one (``null_of``, the source's; default
    ``null``) with probability ``prob``: how a model learns the unconditional prediction that
    guidance extrapolates from (Ho & Salimans 2022, Algorithm 1). No random numbers are drawn
    for an empty condition."""
    if not cond or prob <= 0:
        return cond
    batch = len(next(iter(cond.values())))
    drop = torch.rand(batch, generator=generator) < prob
    empty = (null_of or null)(cond)
    return {key: torch.where(drop.view((-1,) + (1,) * (value.dim() - 1)), empty[key], value)
            for key, value in cond.items()}


Estimate = Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor]


def guided(estimate: Estimate, cond: Cond, scale: float,
           interval: tuple[float, float] = (0.0, 1.0)) -> Callable[[torch.Tensor, torch.Tensor],
                                                                    torch.Tensor]:
    """Classifier-free guidance as a denoiser: ``D_u + scale (D_c - D_u)``, the conditional and
    unconditional halves in one batched forward (k-diffusion's ``CFGDenoiser``). The estimates
    are linear in the network output at fixed ``(x, t)``, so guiding the denoised estimate is
    guiding the noise (or v, or velocity) estimate. Outside ``interval`` (a range of t) the
    conditional estimate alone is used: guidance only at middle noise levels keeps diversity
    and costs half the evaluations elsewhere (Kynkaanniemi et al. 2024). ``scale`` 1 or an
    empty condition is plain conditional sampling."""
    lo, hi = interval

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        level = float(t.reshape(-1)[0])
        if not cond or scale == 1.0 or not lo <= level <= hi:
            return estimate(x, t, cond)
        both = estimate(torch.cat([x, x]), torch.cat([t, t]), joined(cond, null(cond)))
        with_cond, without = both.chunk(2)
        return without + scale * (with_cond - without)

    return denoise
