"""Stage 2 backbone: a Diffusion Transformer (Peebles & Xie 2023, "DiT").

The latent is cut into ``patch_size`` x ``patch_size`` patches, one token each, plus a fixed 2-D
sin-cos position embedding (He et al. 2022, MAE). Every block is pre-norm self-attention then an
MLP, both modulated by adaLN-Zero: the time embedding regresses a shift, scale and gate for each
branch, and the gates start at zero, so every block starts as the identity (the paper's best
conditioning, sec. 3.2 and fig. 5). A caption enters through a cross-attention layer between
each block's self-attention and MLP (PixArt-alpha, Chen et al. 2023; models/text.py). Time is
embedded as diffusers' ``DiTTransformer2DModel``
embeds its discrete step ``999 t``, so ``ldmkit export`` writes a model that diffusers loads as
its own class (models/diffusers_export.py). The backbone knows nothing of objectives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldmkit.models.layers import LabelEmbedding, attend, timestep_embedding, zero_init
from ldmkit.models.text import ConditionedBackbone, CrossAttention, Text, text_input

FREQUENCIES = 256  # sinusoidal features of t before the time MLP (DiT's frequency_embedding_size)
TIME_STEPS = 999.0  # t = 1 is diffusers' last discrete step (num_train_timesteps - 1)


def sincos_2d(width: int, grid: int) -> torch.Tensor:
    """Fixed position embedding ``[grid * grid, width]`` of a row-major grid of tokens: the first
    half of the features encode the column, the second the row (MAE's ``get_2d_sincos``)."""
    freqs = 1.0 / 10_000 ** (torch.arange(width // 4, dtype=torch.float64) / (width // 4))
    row, col = torch.meshgrid(torch.arange(grid, dtype=torch.float64),
                              torch.arange(grid, dtype=torch.float64), indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        args = pos.reshape(-1, 1) * freqs[None]
        return torch.cat([torch.sin(args), torch.cos(args)], dim=1)

    return torch.cat([encode(col), encode(row)], dim=1).float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class DiTBlock(nn.Module):
    """Self-attention and MLP on ``[B, N, D]`` tokens, each gated by adaLN-Zero from ``c``."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: int = 4,
                 context_dim: int | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.cross = CrossAttention(width, context_dim, num_heads) if context_dim else None
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = width * mlp_ratio
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(hidden, width))
        self.modulation = zero_init(nn.Linear(width, 6 * width))
        self.logit_probe: list[float] | None = None  # layers.largest_attention_logit's

    def forward(self, x: torch.Tensor, c: torch.Tensor, text: Text | None = None
                ) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = (
            self.modulation(F.silu(c))[:, None].chunk(6, dim=-1))  # each [B, 1, D]
        b, n, d = x.shape
        h = modulate(self.norm1(x), shift1, scale1)
        q, k, v = self.qkv(h).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(
            2, 0, 3, 1, 4)  # each [B, heads, N, D/heads]
        h = attend(q, k, v, self.logit_probe).transpose(1, 2).reshape(b, n, d)
        x = x + gate1 * self.proj(h)
        if self.cross is not None and text is not None:
            x = x + self.cross(x, text)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class DiT(ConditionedBackbone):
    """``forward(x [B, C, h, w], t [B] in [0, 1], **cond) -> [B, C, h, w]``, the objective's
    target. With ``num_classes`` the label embedding is added to the time embedding that drives
    every adaLN (DiT's class conditioning); None or -1: the null class. With ``text_encoder``
    every block attends to the caption's tokens (the UNet's inputs)."""

    def __init__(self, in_channels: int, latent_size: int, patch_size: int = 2,
                 hidden_size: int = 256, depth: int = 6, num_heads: int = 4,
                 num_classes: int | None = None, text_encoder: str | None = None,
                 text_width: int = 128, text_depth: int = 2, text_max_length: int = 64,
                 text_context_dim: int | None = None, text_pooled_dim: int | None = None):
        super().__init__()
        self.patch_size, self.num_classes = patch_size, num_classes
        self.patchify = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.register_buffer("pos", sincos_2d(hidden_size, latent_size // patch_size)[None],
                             persistent=False)
        self.time_mlp = nn.Sequential(nn.Linear(FREQUENCIES, hidden_size), nn.SiLU(),
                                      nn.Linear(hidden_size, hidden_size))
        self.label_emb = LabelEmbedding(num_classes, hidden_size) if num_classes else None
        self.text = text_input(text_encoder, text_width, text_depth, text_max_length,
                               text_context_dim, text_pooled_dim)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, context_dim=self.text.width
                                             if self.text is not None else None) for _ in range(depth))
        self.norm_out = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.modulation_out = nn.Linear(hidden_size, 2 * hidden_size)
        self.out = nn.Linear(hidden_size, patch_size * patch_size * in_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        """DiT's initialisation (its ``initialize_weights``): Xavier-uniform linear and patch
        layers, N(0, 0.02) time MLP, and zero modulations and output, so the untrained network
        predicts 0 (the trivial predictor the loss bands start from)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.patchify.weight.view(self.patchify.out_channels, -1))
        nn.init.zeros_(self.patchify.bias)
        for layer in (self.time_mlp[0], self.time_mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        for layer in [block.modulation for block in self.blocks] + [self.modulation_out, self.out]:
            zero_init(layer)
        for block in self.blocks:
            if block.cross is not None:
                zero_init(block.cross.proj)

    def denoise(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None,
                text: Text | None = None) -> torch.Tensor:
        """The network given the encoded caption (diffusers' ``encoder_hidden_states``)."""
        b, channels, height, width = x.shape
        p = self.patch_size
        c = self.time_mlp(timestep_embedding(t, FREQUENCIES, steps=TIME_STEPS, freq_shift=1))
        if self.label_emb is not None:
            c = c + self.label_emb(labels, b, x.device)
        h = self.patchify(x).flatten(2).transpose(1, 2) + self.pos  # [B, N, D]
        for block in self.blocks:
            h = block(h, c, text)
        shift, scale = self.modulation_out(F.silu(c))[:, None].chunk(2, dim=-1)
        y = self.out(modulate(self.norm_out(h), shift, scale))  # [B, N, p * p * C]
        y = y.reshape(b, height // p, width // p, p, p, channels)
        return torch.einsum("nhwpqc->nchpwq", y).reshape(b, channels, height, width)
