"""Stage 2 backbone: a UNet predicting the noise (Ho et al. 2020; Dhariwal & Nichol 2021, "ADM").

Residual blocks conditioned on a sinusoidal time embedding, self-attention at the resolutions
listed in ``attention_resolutions`` (latent side lengths), skip connections between levels.
Conditioned on a class (a label embedding added to the time embedding, ADM) or on a caption
(cross-attention after each self-attention and the pooled text embedding added to the time
embedding, as Stable Diffusion and SDXL; models/text.py). The backbone knows nothing of
schedules or losses: ``ldmkit.diffusion`` wraps it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldmkit.models.layers import (
    Downsample,
    LabelEmbedding,
    ResBlock,
    SelfAttention,
    Upsample,
    group_norm,
    timestep_embedding,
    zero_init,
)
from ldmkit.models.text import ConditionedBackbone, CrossAttention, Text, text_input


class Level(nn.Module):
    """A residual block, optionally followed by self-attention and, given a ``context_dim``,
    cross-attention to a caption."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, attn: bool, heads: int,
                 dropout: float, context_dim: int | None = None):
        super().__init__()
        self.res = ResBlock(c_in, c_out, emb_dim, dropout)
        self.attn = SelfAttention(c_out, heads) if attn else nn.Identity()
        self.cross = CrossAttention(c_out, context_dim, heads) if attn and context_dim else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor, text: Text | None = None
                ) -> torch.Tensor:
        h = self.attn(self.res(x, emb))
        if self.cross is None or text is None:
            return h
        b, c, height, width = h.shape
        seq = h.flatten(2).transpose(1, 2)  # [B, HW, C]
        return h + self.cross(seq, text).transpose(1, 2).reshape(b, c, height, width)


class UNet(ConditionedBackbone):
    """``forward(x [B, C, h, w], t [B] in [0, 1], **cond) -> [B, C, h, w]``, the objective's
    target. With ``num_classes`` a class embedding is added to the time embedding (ADM's
    class-conditional UNet); ``labels`` None or -1 is the null class. With ``text_encoder``
    the caption (``builtin``: its byte ``tokens``; a frozen encoder: its cached ``context``,
    ``context_mask`` and ``pooled``; models/text.py) is attended to and its pooled embedding
    added to the time embedding (SDXL); None or all padding is the null caption."""

    def __init__(self, in_channels: int, latent_size: int, base_channels: int = 64,
                 channel_mult: list[int] | tuple[int, ...] = (1, 2), num_res_blocks: int = 2,
                 attention_resolutions: list[int] | tuple[int, ...] = (4,), num_heads: int = 4,
                 dropout: float = 0.0, num_classes: int | None = None,
                 text_encoder: str | None = None, text_width: int = 128, text_depth: int = 2,
                 text_max_length: int = 64, text_context_dim: int | None = None,
                 text_pooled_dim: int | None = None):
        super().__init__()
        self.base_channels, self.num_classes = base_channels, num_classes
        emb_dim = 4 * base_channels
        self.time_mlp = nn.Sequential(
            nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.label_emb = LabelEmbedding(num_classes, emb_dim) if num_classes else None
        self.text = text_input(text_encoder, text_width, text_depth, text_max_length,
                               text_context_dim, text_pooled_dim)
        # zero, as cross-attention's output: the caption starts with no effect (cond_gap 0)
        self.pooled_emb = zero_init(nn.Linear(self.text.pooled_dim, emb_dim)) \
            if self.text is not None and self.text.pooled_dim else None
        context = self.text.width if self.text is not None else None
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        self.down = nn.ModuleList()
        skips, ch, size = [base_channels], base_channels, latent_size
        for i, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                out = base_channels * mult
                self.down.append(Level(ch, out, emb_dim, size in attention_resolutions,
                                       num_heads, dropout, context))
                ch = out
                skips.append(ch)
            if i < len(channel_mult) - 1:
                self.down.append(Downsample(ch))
                skips.append(ch)
                size //= 2

        self.mid = nn.ModuleList([
            Level(ch, ch, emb_dim, True, num_heads, dropout, context),
            Level(ch, ch, emb_dim, False, num_heads, dropout),
        ])

        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                out = base_channels * mult
                self.up.append(Level(ch + skips.pop(), out, emb_dim,
                                     size in attention_resolutions, num_heads, dropout, context))
                ch = out
            if i > 0:
                self.up.append(Upsample(ch))
                size *= 2

        self.norm_out = group_norm(ch)
        self.conv_out = zero_init(nn.Conv2d(ch, in_channels, 3, padding=1))

    def denoise(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None,
                text: Text | None = None) -> torch.Tensor:
        """The network given the encoded caption (diffusers' ``encoder_hidden_states``)."""
        emb = self.time_mlp(timestep_embedding(t, self.base_channels))
        if self.label_emb is not None:
            emb = emb + self.label_emb(labels, len(x), x.device)
        if self.pooled_emb is not None and text is not None:
            emb = emb + self.pooled_emb(text.pooled) * text.present[:, None]
        h = self.conv_in(x)
        hs = [h]
        for layer in self.down:
            h = layer(h, emb, text) if isinstance(layer, Level) else layer(h)
            hs.append(h)
        for layer in self.mid:
            h = layer(h, emb, text)
        for layer in self.up:
            h = layer(torch.cat([h, hs.pop()], dim=1), emb, text) if isinstance(layer, Level) \
                else layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))
