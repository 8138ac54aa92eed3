"""Minimal reproduction of the inductor defect that made compiled bf16 training train worse.

Run: ``.venv/bin/python benchmarks/inductor_upsample_repro.py`` (about 20 s). Exit status 1
while the defect is present, 0 once the installed torch computes the gradient right.

conv -> nearest x2 upsampling -> conv -> conv under CPU bf16 autocast, 16 channels: the
gradient that reaches the first convolution through the upsampling is exactly zero when the
graph is compiled by inductor (``aot_eager`` is right). In the generated backward, inductor
fuses the zero-fill of the fp32 buffer that ``upsample_nearest2d_backward`` accumulates into
(an ``index_put`` with ``accumulate=True``, ``atomic_add``) with the bf16 copy that the first
convolution's backward reads, and schedules the accumulation after both: the copy reads the
zeros. Every layer below an ``Upsample`` of ldmkit's UNet (the mid blocks, the 4x4 levels and
their skip sources) got no gradient, and the autoencoder's encoder got its gradient through the
skip-free path only. Seen with torch 2.13.0 (CPU build) on AMD EPYC and with 8, 16 and 32
channels at batch 1 to 8; 3 and 4 channels compute right (another kernel layout).

ldmkit routes around it in ``ldmkit.models.layers.upsample_nearest_2x``: when compiling, the
upsampling is a broadcast and reshape, whose backward is a sum, not an ``index_put``.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F


def step(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", torch.bfloat16):
        h = F.conv2d(x, w1, padding=1)
        h = F.interpolate(h, scale_factor=2.0, mode="nearest")
        h = F.conv2d(h, w2, padding=1)
        return F.conv2d(h, w3, padding=1)


def first_gradient(fn, channels: int = 16, batch: int = 2) -> float:
    """The norm of the first convolution's weight gradient."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, 4, 4, generator=gen)
    w1 = torch.randn(channels, 4, 3, 3, generator=gen).requires_grad_()
    w2 = torch.randn(channels, channels, 3, 3, generator=gen).requires_grad_()
    w3 = torch.randn(4, channels, 3, 3, generator=gen).requires_grad_()
    fn(x, w1, w2, w3).float().pow(2).mean().backward()
    return float(w1.grad.norm())


def main() -> int:
    eager = first_gradient(step)
    compiled = first_gradient(torch.compile(step))
    print(f"torch {torch.__version__}: |grad w1| eager {eager:.4g}, inductor {compiled:.4g}")
    wrong = abs(compiled - eager) > 1e-2 * eager
    print("inductor's gradient is WRONG" if wrong else "inductor's gradient is right")
    return int(wrong)


if __name__ == "__main__":
    sys.exit(main())
