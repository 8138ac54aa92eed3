"""Generate images from a trained run: sample latents, measure them, decode, save PNGs.

The same ``generate`` serves sampling during training (fixed seed, so grids are comparable across
steps) and ``ldmkit sample``. The sample vitals are measured on the latents handed to the decoder,
i.e. after dividing by the scale (guide: final_latent_stats).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ldmkit.config import Config, from_dict
from ldmkit.data import to_uint8
from ldmkit.diffusion.parameterization import Parameterization, parameterization_of
from ldmkit.diffusion.samplers import run_sampler
from ldmkit.distributed import SINGLE, Dist, all_gather_cat, shard, shard_size
from ldmkit.files import check_output
from ldmkit.images import image_grid, save_png, to_pil
from ldmkit.logging import MetricLogger
from ldmkit.models.autoencoder import Autoencoder
from ldmkit.preemption import Preempted, StopRequest
from ldmkit.rundir import writing_run
from ldmkit.vitals.metrics import sample_vitals


@dataclass
class Samples:
    latents: torch.Tensor  # [N, C, h, w] decoder space (divided by the scale)
    images: torch.Tensor  # [N, C, H, W] uint8
    vitals: dict[str, float]


def parameterization(cfg: Config) -> Parameterization:
    return parameterization_of(cfg.diffusion)


def start_noise(num: int, shape: tuple[int, ...], seed: int
                ) -> tuple[torch.Tensor, torch.Generator]:
    """``num`` draws of ``N(0, I)`` of ``shape`` from ``seed``, and the generator after them
    (which an ancestral sampler goes on drawing from)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((num, *shape), generator=gen), gen


@torch.no_grad()
def decode_images(ae: Autoencoder, latents: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Decoder-space latents ``[N, C, h, w]`` -> uint8 images ``[N, C, H, W]``, in batches."""
    return torch.cat([to_uint8(ae.decode(z)) for z in latents.split(batch_size)])


@torch.no_grad()
def generate(model: nn.Module, ae: Autoencoder, scale: float, cfg: Config, num: int,
             sampler: str, steps: int, seed: int, eta: float = 0.0,
             batch_size: int = 256, d: Dist = SINGLE,
             interrupt: Callable[[], bool] | None = None) -> Samples:
    """Sample ``num`` latents in batches from ``N(0, I)`` drawn with ``seed``, then decode.

    Under DDP each rank samples its shard of the same noise and the latents are gathered, so
    the sample vitals are those of all ``num`` samples; rank 0 alone decodes (others get no
    images). ``interrupt`` is asked at every sampler step; when it says yes, sampling ends with
    ``Preempted`` (a SIGTERM must not wait for a whole sampling).
    """
    device = next(model.parameters()).device
    shape = (ae.latent_channels, cfg.data.image_size // ae.downsample_factor,
             cfg.data.image_size // ae.downsample_factor)
    shard_size(num, d, "the number of samples")
    noise, gen = start_noise(num, shape, seed)
    noise = shard(noise, d)
    if d.active:  # ancestral noise must differ between shards
        gen = torch.Generator().manual_seed(seed * 1_000_003 + d.rank + 1)
    param = parameterization(cfg)
    schedule, denoise = param.schedule, param.denoiser(model)
    was_training = model.training
    model.eval()

    def check(i: int, *_: torch.Tensor) -> None:
        if interrupt is not None and interrupt():
            raise Preempted("sampling", i, "stop")

    try:
        parts = [run_sampler(sampler, denoise, chunk.to(device), schedule, steps, eta, gen, check)
                 for chunk in noise.split(batch_size)]
    finally:
        model.train(was_training)
    latents = all_gather_cat(torch.cat(parts).float(), d).cpu() / scale
    images = (decode_images(ae, latents, batch_size) if d.is_main
              else torch.empty(0, dtype=torch.uint8))
    return Samples(latents, images, sample_vitals(latents))


def save_samples(samples: Samples, out_dir: Path, singles: bool = True) -> Path:
    """Write ``grid.png`` (and ``000000.png``... for each sample) into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    grid_path = out_dir / "grid.png"
    save_png(image_grid(samples.images), grid_path)
    if singles:
        for i, img in enumerate(samples.images):
            save_png(to_pil(img), out_dir / f"{i:06d}.png")
    return grid_path


def sample_run(run_dir: str | Path, num: int, sampler: str, steps: int, seed: int,
               eta: float = 0.0, out_dir: str | Path | None = None) -> tuple[Path, Samples]:
    """``ldmkit sample``: EMA weights of the last checkpoint -> PNGs and logged sample vitals."""
    from ldmkit.resume import load_for_sampling

    run_dir = Path(run_dir)
    if out_dir is not None:
        check_output(Path(out_dir), "--out", directory=True)
    with writing_run(run_dir), StopRequest() as stop:
        cfg_dict, step, model, ae, scale, _ = load_for_sampling(run_dir)
        cfg = from_dict(cfg_dict)
        samples = generate(model, ae, scale, cfg, num, sampler, steps, seed, eta,
                           interrupt=lambda: stop.requested)
        out = Path(out_dir) if out_dir else \
            run_dir / "samples" / f"{sampler}{steps}-seed{seed}-n{num}"
        grid = save_samples(samples, out)
        with MetricLogger(run_dir, tensorboard=cfg.tensorboard) as logger:
            logger.log(step, samples.vitals)
    return grid, samples
