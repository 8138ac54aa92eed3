"""Building blocks shared by the autoencoder and the backbones (Ho et al. 2020; Dhariwal & Nichol
2021)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= 32 that divides ``channels``."""
    groups = next(g for g in range(min(32, channels), 0, -1) if channels % g == 0)
    return nn.GroupNorm(groups, channels, eps=1e-6)


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters so a residual branch starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """Pre-norm residual block; ``emb`` (if given) adds a per-channel scale and shift (FiLM)."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out) if emb_dim else None
        self.norm2 = group_norm(c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.norm2(h)
        if self.emb is not None and emb is not None:
            scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
            h = h * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, probe: list[float] | None,
           mask: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention of ``[B, heads, N, d]`` queries on ``[B, heads, M, d]``
    keys; ``mask [B, M]`` (bool) leaves out the keys where it is False (a caption's padding).
    With ``probe`` (a list), also appends the largest attention logit q.k / sqrt(d), whose
    growth comes before a transformer's divergence (Wortsman et al. 2023). Only
    ``largest_attention_logit`` sets it: the training step never materialises the logits."""
    keep = None if mask is None else mask[:, None, None, :]  # [B, 1, 1, M]
    if probe is not None:  # the logits of masked keys never reach the output
        logits = q @ k.transpose(-1, -2)
        probe.append(float((logits if keep is None else logits.masked_fill(
            ~keep, float("-inf"))).amax()) * q.shape[-1] ** -0.5)
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        # CPU's bf16 flash-attention backward took 12x fp32's (18 vs 1.5 ms a layer, the DiT
        # of configs/digits-dit.yaml; benchmarks/dit_profile.py): attention runs in fp32 there
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                  attn_mask=keep).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)


@torch.no_grad()
def largest_attention_logit(model: nn.Module, forward: Callable[[], object]) -> float | None:
    """The largest attention logit of every attention layer of ``model`` that ``forward()``
    runs (``optimization/attn_logit_max``); None for a model without ldmkit's attention."""
    layers = [m for m in model.modules() if hasattr(m, "logit_probe")]
    if not layers:
        return None
    found: list[float] = []
    for layer in layers:
        layer.logit_probe = found
    try:
        forward()
    finally:
        for layer in layers:
            layer.logit_probe = None
    return max(found) if found else None


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions of a feature map."""

    def __init__(self, channels: int, num_heads: int = 4):
        super().__init__()
        heads = max(1, min(num_heads, channels // 8)) if channels % num_heads else num_heads
        self.num_heads = heads
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = zero_init(nn.Conv2d(channels, channels, 1))
        self.logit_probe: list[float] | None = None  # largest_attention_logit's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w)
        q, k, v = (t.transpose(-1, -2) for t in qkv.unbind(1))  # each [B, heads, HW, C/heads]
        y = attend(q, k, v, self.logit_probe)
        return x + self.out(y.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def upsample_nearest_2x(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour upsampling by 2, ``[B, C, h, w] -> [B, C, 2h, 2w]``.

    Eager: ``F.interpolate``. Compiled: the same values as a broadcast and reshape, because
    inductor (torch 2.13, CPU, bf16 autocast) reads the gradient of ``F.interpolate``'s
    backward before accumulating it, so every layer below the upsampling learned nothing
    (``benchmarks/inductor_upsample_repro.py``; BENCHMARKS.md "Why compiled training trained
    worse"). A broadcast's backward is a sum, which it compiles right."""
    if not torch.compiler.is_compiling():
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    b, c, h, w = x.shape
    return x[:, :, :, None, :, None].expand(b, c, h, 2, w, 2).reshape(b, c, 2 * h, 2 * w)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(upsample_nearest_2x(x))


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0,
                       steps: float = 1000.0, freq_shift: int = 0) -> torch.Tensor:
    """Sinusoidal features ``[cos, sin]`` of continuous ``t`` in [0, 1] ``[B] -> [B, dim]``
    (Vaswani et al. 2017).

    ``t`` is multiplied by ``steps`` so the frequencies cover the same range as discrete DDPM
    steps; ``freq_shift`` 1 spaces the frequencies as diffusers' DiT does (models/dit.py).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device)
                      / (half - freq_shift))
    args = steps * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class LabelEmbedding(nn.Module):
    """Class labels ``[B]`` -> ``[B, dim]``, added to the time embedding (ADM's ``label_emb``;
    DiT's ``LabelEmbedder``).

    Label -1 (``condition.NULL_LABEL``), or no ``labels``, is the null class that
    classifier-free guidance samples the unconditional model with. Its row (index
    ``num_classes``) is fixed at zero, which loses nothing (a learned null row is the time
    embedding's bias), and the class rows start at zero too: a class whose label never reaches
    the model keeps the null class's embedding, so the conditional and unconditional
    predictions of a model trained without labels are equal (``conditioning/cond_gap`` 0).

    The table is multiplied by ``sqrt(dim)``, an input embedding's own learning-rate multiplier
    under Adam (as muP gives it; Yang et al. 2021): Adam moves a row by about the learning rate
    per coordinate and step, while the time MLP's output moves by its fan-in times that, so an
    unscaled table is drowned by the time embedding. Measured on the digits, 800 steps, class
    accuracy at guidance 3: DiT 0.12 unscaled, 0.88 scaled; UNet 0.88 and 0.96."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes, self.gain = num_classes, dim**0.5
        self.table = nn.Embedding(num_classes + 1, dim, padding_idx=num_classes)
        nn.init.zeros_(self.table.weight)

    def forward(self, labels: torch.Tensor | None, batch: int, device: torch.device
                ) -> torch.Tensor:
        if labels is None:
            labels = torch.full((batch,), self.num_classes, device=device)
        return self.gain * self.table(torch.where(labels < 0, self.num_classes, labels))

    @torch.no_grad()
    def rows(self) -> torch.Tensor:
        """``[num_classes + 1, dim]``: the embedding of each label, the null class last."""
        return self.gain * self.table.weight
