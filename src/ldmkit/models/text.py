"""Captions into the backbones: a byte-level text encoder and cross-attention.

The built-in encoder reads UTF-8 bytes (ByT5's vocabulary without its special tokens; Xue et
al. 2022), so it needs no vocabulary file and nothing to download, and trains jointly with the
backbone. A learned start token leads every caption; its output is the pooled embedding (as
CLIP pools its end token).

Cross-attention lets every position of the latent attend to the caption's tokens, padding
masked (Rombach et al. 2022, sec. 3.3, as Stable Diffusion's UNet; PixArt-alpha's DiT blocks,
Chen et al. 2023); its output projection starts at zero, so a text-conditional backbone starts
as its unconditional self.

The empty caption (all padding: a dropped one, for classifier-free guidance) is the null
condition, and the text adds nothing for it: cross-attention and the pooled embedding are
multiplied by ``present`` (0 for it), as the class embedding's null row is fixed at zero
(layers.LabelEmbedding; a learned null would be a constant the backbone's biases can learn).
So a model trained on dropped captions only never trains its text path, whose output stays
zero, and ``conditioning/cond_gap`` is exactly 0: ``conditioning_ignored``, not noise.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from ldmkit.diffusion.condition import CONTEXT, CONTEXT_MASK, LABELS, POOLED, TOKENS
from ldmkit.models.layers import attend, zero_init

PAD = 0  # token of padding; byte b is token b + 1
VOCAB = 257
HEADS = 4


def tokenize(texts: list[str], max_length: int) -> torch.Tensor:
    """Captions -> ``[N, max_length]`` int64 byte tokens, cut at ``max_length`` UTF-8 bytes
    (a cut never leaves half a character) and padded with ``PAD``."""
    out = torch.full((len(texts), max_length), PAD, dtype=torch.int64)
    for row, text in enumerate(texts):
        data = text.encode("utf-8")[:max_length].decode("utf-8", errors="ignore").encode("utf-8")
        if data:
            out[row, :len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).long() + 1
    return out


class Text(NamedTuple):
    """An encoded caption: ``context [B, M, D]``, ``mask [B, M]`` (bool: not padding),
    ``pooled [B, D]`` and ``present [B]`` (1.0, or 0.0 for the empty caption)."""

    context: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor
    present: torch.Tensor


class CrossAttention(nn.Module):
    """``x [B, N, width]`` attends to a caption's ``context [B, M, context_dim]`` where its
    ``mask [B, M]``; returns the residual branch (added by the caller), zero for an empty
    caption. Queries are layer-normed, as in a pre-norm transformer block."""

    def __init__(self, width: int, context_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(context_dim, 2 * width)
        self.proj = zero_init(nn.Linear(width, width))
        self.logit_probe: list[float] | None = None  # layers.largest_attention_logit's

    def forward(self, x: torch.Tensor, text: Text) -> torch.Tensor:
        b, n, width = x.shape
        context, mask = text.context, text.mask
        heads, m = self.num_heads, context.shape[1]
        q = self.q(self.norm(x)).reshape(b, n, heads, width // heads).transpose(1, 2)
        k, v = self.kv(context).reshape(b, m, 2, heads, width // heads).permute(2, 0, 3, 1, 4)
        h = attend(q, k, v, self.logit_probe, mask)  # [B, heads, N, width / heads]
        out = self.proj(h.transpose(1, 2).reshape(b, n, width))
        return out * text.present.to(out.dtype)[:, None, None]


class TextBlock(nn.Module):
    """Pre-norm self-attention over the caption's tokens (padding masked), then an MLP."""

    def __init__(self, width: int, num_heads: int = HEADS):
        super().__init__()
        self.num_heads = num_heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, width = h.shape
        q, k, v = self.qkv(self.norm1(h)).reshape(b, n, 3, self.num_heads, -1).permute(
            2, 0, 3, 1, 4)  # each [B, heads, N, width / heads]
        h = h + self.proj(attend(q, k, v, None, mask).transpose(1, 2).reshape(b, n, width))
        return h + self.mlp(self.norm2(h))


class ByteTextEncoder(nn.Module):
    """``tokens [B, L]`` (None: the empty caption) -> ``Text`` with ``1 + L`` context rows."""

    keys = (TOKENS,)

    def __init__(self, width: int = 128, depth: int = 2, max_length: int = 64):
        super().__init__()
        self.max_length, self.width, self.pooled_dim = max_length, width, width
        self.embed = nn.Embedding(VOCAB, width, padding_idx=PAD)
        self.start = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, 1 + max_length, width) * 0.02)
        self.blocks = nn.ModuleList(TextBlock(width) for _ in range(depth))
        self.norm = nn.LayerNorm(width)

    def forward(self, batch: int, device: torch.device, tokens: torch.Tensor | None = None,
                **_: torch.Tensor | None) -> Text:
        if tokens is None:
            tokens = torch.full((batch, self.max_length), PAD, device=device, dtype=torch.int64)
        b, length = tokens.shape
        h = torch.cat([self.start.expand(b, -1, -1), self.embed(tokens)], 1) + \
            self.pos[:, :1 + length]
        mask = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=tokens.device),
                          tokens != PAD], 1)
        for block in self.blocks:
            h = block(h, mask)
        h = self.norm(h)
        present = mask[:, 1:].any(1).float()
        return Text(h, mask, h[:, 0] * present[:, None], present)


class EncodedText(nn.Module):
    """A frozen encoder's cached output as the backbone's input (models/hf_text.py): its
    ``context [B, L, D]``, ``context_mask [B, L]`` and ``pooled [B, P]`` become ``Text``.
    Both are layer-normed without weights: encoders' output scales differ by orders of
    magnitude (a random tiny CLIP's projected embedding is ~0.02, ViT-L's ~20), and the
    zero-initialised layers they feed learn at a rate proportional to it. Nothing here
    trains. A row whose mask is all False is the null condition
    (``diffusion.condition.null``'s zeros, as ``train.cond_drop_prob`` and guidance make it),
    read as the encoded empty caption, which Stable Diffusion trains on for guidance and
    ``set_null`` stores here (so the checkpoint holds it and sampling needs no encoder for
    the unconditional half)."""

    def __init__(self, context_dim: int, pooled_dim: int | None, max_length: int, encoder: str):
        super().__init__()
        self.width, self.pooled_dim, self.max_length = context_dim, pooled_dim, max_length
        self.encoder = encoder  # the directory prompts are encoded with (model.text_encoder)
        self.keys = (CONTEXT, CONTEXT_MASK) + ((POOLED,) if pooled_dim else ())
        null_mask = torch.zeros(max_length, dtype=torch.bool)
        null_mask[0] = True  # never an all-masked attention, even before set_null
        self.register_buffer("null_context", torch.zeros(max_length, context_dim))
        self.register_buffer("null_mask", null_mask)
        self.register_buffer("null_pooled", torch.zeros(pooled_dim or 0))

    @torch.no_grad()
    def set_null(self, context: torch.Tensor, mask: torch.Tensor,
                 pooled: torch.Tensor | None) -> None:
        """The empty caption's encoding: ``context [L, D]``, ``mask [L]``, ``pooled [P]``."""
        self.null_context.copy_(context)
        self.null_mask.copy_(mask)
        if pooled is not None:
            self.null_pooled.copy_(pooled)

    def forward(self, batch: int, device: torch.device, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None, pooled: torch.Tensor | None = None,
                **_: torch.Tensor | None) -> Text:
        if context is None:
            context = torch.zeros(batch, self.max_length, self.width, device=device)
            context_mask = torch.zeros(batch, self.max_length, dtype=torch.bool, device=device)
        empty = ~context_mask.any(1)  # [B]
        context = torch.where(empty[:, None, None], self.null_context,
                              context.to(self.null_context.dtype))
        mask = torch.where(empty[:, None], self.null_mask, context_mask)
        if self.pooled_dim:
            pooled = self.null_pooled.expand(batch, -1) if pooled is None else pooled
            pooled = torch.where(empty[:, None], self.null_pooled,
                                 pooled.to(self.null_pooled.dtype))
            pooled = F.layer_norm(pooled, (self.pooled_dim,))
        context = F.layer_norm(context, (self.width,))
        return Text(context, mask, pooled, torch.ones(batch, device=device))


def text_input(text_encoder: str | None, width: int, depth: int, max_length: int,
               context_dim: int | None, pooled_dim: int | None
               ) -> ByteTextEncoder | EncodedText | None:
    """A backbone's text input for ``model.text_encoder``: the built-in encoder, a frozen
    one's cached states (``context_dim``, ``pooled_dim`` from its config), or None."""
    if not text_encoder:
        return None
    if text_encoder == "builtin":
        return ByteTextEncoder(width, depth, max_length)
    return EncodedText(context_dim, pooled_dim, max_length, text_encoder)


class ConditionedBackbone(nn.Module):
    """What the UNet and the DiT share about their condition: the keys they take, and a
    forward that encodes the caption (if any) and hands it to ``denoise(x, t, labels, text)``,
    which the diffusers export calls directly with ``encoder_hidden_states``. A subclass sets
    ``num_classes`` and ``text`` (``text_input``'s module, or None)."""

    num_classes: int | None
    text: ByteTextEncoder | EncodedText | None

    @property
    def condition_keys(self) -> tuple[str, ...]:
        """The condition it takes (diffusion/condition.py's keys)."""
        return (LABELS,) if self.num_classes else self.text.keys if self.text else ()

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None,
                **text_inputs: torch.Tensor) -> torch.Tensor:
        text = self.text(len(x), x.device, **text_inputs) if self.text is not None else None
        return self.denoise(x, t, labels, text)

    def denoise(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None,
                text: Text | None = None) -> torch.Tensor:
        raise NotImplementedError
