"""PNG output of uint8 image tensors: single images and grids."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldmkit.platform.files import write_bytes_atomic


def image_grid(images: torch.Tensor, pad: int = 2, columns: int | None = None) -> Image.Image:
    """Tile uint8 ``[N, C, H, W]`` into a grid (near-square unless ``columns``) on white."""
    n, c, h, w = images.shape
    cols = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(images.permute(0, 2, 3, 1).numpy()):
        r, q = divmod(i, cols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = img
    return Image.fromarray(grid[..., 0] if c == 1 else grid)


def to_pil(image: torch.Tensor) -> Image.Image:
    """uint8 ``[C, H, W]`` -> a grayscale or RGB PIL image."""
    array = image.permute(1, 2, 0).numpy()
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def save_png(image: Image.Image, path: Path) -> None:
    """Write a PNG atomically; a link at ``path`` is replaced, never written through."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    write_bytes_atomic(path, buffer.getvalue())
