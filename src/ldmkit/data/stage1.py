"""Stage 1: train, save and load the autoencoder, and calibrate the latent scale.

The scale makes the latents the diffusion model sees unit-variance (guide: latent/z_std must be
~1.0). CompVis' ``scale_by_std`` estimates it from the first batch; here it is the global std over
``calibration_batches`` batches, which is stable for small batches and skewed datasets.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from tqdm import tqdm

from ldmkit.config import AutoencoderConfig, Config
from ldmkit.data.sources import BatchOrder, ImageData, to_uint8
from ldmkit.errors import CheckpointError
from ldmkit.models.autoencoder import Autoencoder, Posterior
from ldmkit.models.diffusers_vae import DiffusersAutoencoder, is_diffusers_vae, load_diffusers_vae
from ldmkit.models.hf_text import EncodedCaptions
from ldmkit.platform.distributed import SINGLE, Dist, all_sum
from ldmkit.platform.fastpath import Compiled, choose, record
from ldmkit.platform.files import load_tensors, read_json, write_dir_atomically
from ldmkit.platform.images import image_grid
from ldmkit.platform.preemption import Preempted, StopRequest
from ldmkit.run.layout import AE_DIR, RunDir
from ldmkit.vitals import metrics as vm
from ldmkit.vitals.logs.metrics_jsonl import MetricLogger

AE_KIND = "autoencoder"


def build_autoencoder(cfg: AutoencoderConfig, channels: int) -> Autoencoder:
    return Autoencoder(channels, cfg.base_channels, cfg.channel_mult, cfg.latent_channels)


def psnr(mse: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio for pixels in [-1, 1] (peak-to-peak range 2)."""
    return 10.0 * torch.log10(4.0 / mse.clamp(min=1e-12))


def train_autoencoder(cfg: Config, data: ImageData, run_dir: Path, logger: MetricLogger,
                      stop: StopRequest | None = None) -> Autoencoder:
    """Reconstruction MSE + ``kl_weight`` * KL, AdamW with cosine decay; logs ``vae/*``.

    Stage 1 is short and saved only when done: a stop request raises ``Preempted`` and a resumed
    run trains it again from the start.
    """
    logger.rewind(0, "autoencoder")
    ae_cfg = cfg.autoencoder
    torch.manual_seed(cfg.seed)
    ae = build_autoencoder(ae_cfg, cfg.data.channels)
    opt = torch.optim.AdamW(ae.parameters(), lr=ae_cfg.lr, weight_decay=0.0)
    order = BatchOrder(len(data), ae_cfg.batch_size, cfg.seed + 1)
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    sums = torch.zeros(3)
    fast = choose(cfg.train.precision, cfg.train.compile, torch.device("cpu"), "autoencoder",
                  ae_cfg.steps)
    record(RunDir(run_dir).fastpath, "autoencoder", 0, fast)
    net = Compiled(ae, fast, tqdm.write, "the autoencoder", lambda eager: record(
        RunDir(run_dir).fastpath, "autoencoder", 0, eager, lambda _: None))
    latent_hw = (cfg.data.image_size // ae.downsample_factor,) * 2
    bar = tqdm(range(ae_cfg.steps), desc="autoencoder", dynamic_ncols=True, mininterval=1.0)
    for step in bar:
        if stop is not None and stop.requested:
            bar.close()
            raise Preempted("autoencoder", step, stop.signal_name or "stop")
        for group in opt.param_groups:
            group["lr"] = ae_cfg.lr * 0.5 * (1 + math.cos(math.pi * step / ae_cfg.steps))
        x = data.batch(order.next())
        noise = torch.randn((len(x), ae.latent_channels, *latent_hw), generator=gen)
        mse, kl = net.run(_autoencoder_step, net, opt, x, noise, ae_cfg.kl_weight)
        sums += torch.stack([mse, kl, psnr(mse)])
        if (step + 1) % ae_cfg.log_every == 0 or step + 1 == ae_cfg.steps:
            n = (step % ae_cfg.log_every) + 1
            mse_v, kl_v, psnr_v = (sums / n).tolist()
            logger.log(step + 1, {vm.VAE_RECON_MSE: mse_v, vm.VAE_KL: kl_v, vm.VAE_PSNR: psnr_v})
            bar.set_postfix(mse=f"{mse_v:.4f}", psnr=f"{psnr_v:.1f}")
            sums.zero_()
    ae.eval().requires_grad_(False)
    with torch.no_grad():
        x = data.batch(torch.arange(min(8, len(data))))
        pairs = to_uint8(torch.cat([x, ae.decode(ae.encode(x).mean)]))
    save_autoencoder(ae, ae_cfg, cfg.data.channels, RunDir(run_dir).autoencoder, pairs)
    return ae


def _autoencoder_step(net: Compiled, opt: torch.optim.Optimizer, x: torch.Tensor,
                      noise: torch.Tensor, kl_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One update of reconstruction MSE + ``kl_weight`` * KL; returns both (detached). The
    loss and the KL are fp32 whatever the network's autocast."""
    with net.fast.autocast():
        recon, mean, logvar = net(x, noise)
    mse = (recon - x).pow(2).mean()
    kl = Posterior(mean, logvar).kl()
    opt.zero_grad(set_to_none=True)
    (mse + kl_weight * kl).backward()
    opt.step()
    return mse.detach(), kl.detach()


def save_autoencoder(ae: Autoencoder, cfg: AutoencoderConfig, channels: int, path: Path,
                     reconstructions: torch.Tensor | None = None) -> None:
    """Weights, architecture, and (for the report) data over reconstructions as a PNG."""
    arch = {"channels": channels, "base_channels": cfg.base_channels,
            "channel_mult": cfg.channel_mult, "latent_channels": cfg.latent_channels}

    def write(tmp: Path) -> None:
        save_file({k: v.contiguous() for k, v in ae.state_dict().items()},
                  str(tmp / "weights.safetensors"))
        (tmp / "meta.json").write_text(json.dumps(arch, indent=2))
        if reconstructions is not None:
            image_grid(reconstructions, columns=len(reconstructions) // 2).save(
                tmp / "reconstructions.png")

    write_dir_atomically(path, write, AE_KIND)


def is_autoencoder_dir(path: Path) -> bool:
    """An ldmkit autoencoder (``meta.json``) or a diffusers AutoencoderKL (``config.json``)."""
    return (path / "meta.json").is_file() or is_diffusers_vae(path)


def autoencoder_dir(path: str | Path) -> Path:
    """The autoencoder folder of ``path``: itself, or the ``autoencoder/`` of a run directory."""
    path = Path(path)
    return path / AE_DIR if is_autoencoder_dir(path / AE_DIR) else path


def load_autoencoder(path: str | Path) -> Autoencoder | DiffusersAutoencoder:
    """Load from an autoencoder directory or from a run directory that holds one."""
    path = autoencoder_dir(path)
    if is_diffusers_vae(path):
        return load_diffusers_vae(path)
    if not (path / "meta.json").is_file() or not (path / "weights.safetensors").is_file():
        raise CheckpointError(f"no trained autoencoder at '{path}'; point autoencoder.pretrained "
                              "at a run directory, its autoencoder/ folder, or a diffusers "
                              "AutoencoderKL directory")
    try:
        arch = read_json(path / "meta.json")
        sizes = [arch["channels"], arch["base_channels"], arch["latent_channels"],
                 *arch["channel_mult"]]
        if not all(type(v) is int and 1 <= v <= 4096 for v in sizes) or not arch["channel_mult"]:
            raise ValueError(f"meta.json holds no architecture ({str(arch)[:80]})")
        ae = Autoencoder(arch["channels"], arch["base_channels"], arch["channel_mult"],
                         arch["latent_channels"])
        ae.load_state_dict(load_tensors(path / "weights.safetensors"))
    except (OSError, KeyError, ValueError, TypeError, RuntimeError, SafetensorError) as exc:
        raise CheckpointError(f"autoencoder at '{path}' cannot be loaded: "
                              f"{str(exc).splitlines()[0]}") from None
    return ae.eval().requires_grad_(False)


@dataclass
class LatentPosteriors:
    """The encoder's Gaussian posterior for every image: mean and log-variance ``[N, C, h, w]``.

    Encoding once lets stage 2 draw ``z ~ q(z|x)`` per step without running the encoder.
    """

    mean: torch.Tensor
    logvar: torch.Tensor
    names: list[str] | None = None  # the image files of a folder dataset, row by row
    labels: torch.Tensor | None = None  # [N] int64 class of each image, when the data has them
    classes: list[str] | None = None  # a folder dataset's class names
    captions: list[str] | None = None  # a folder's caption of each image (text-conditional)
    encoded: EncodedCaptions | None = None  # by a frozen text encoder: its distinct captions

    def describe(self, rows: list[int]) -> str:
        """The images at dataset ``rows`` as a user finds them: file names, else indices."""
        if self.names is not None and all(0 <= r < len(self.names) for r in rows):
            return "images " + ", ".join(repr(self.names[r]) for r in rows)
        return f"dataset indices {rows}"

    def sample(self, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        mean, logvar = self.mean[index], self.logvar[index]
        return mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator)


def calibrate_latent_scale(latents: LatentPosteriors, batches: int, batch_size: int,
                           seed: int, d: Dist = SINGLE) -> float:
    """``1 / std`` of ``z ~ q(z|x)`` pooled over ``batches`` batches (at most one epoch).

    Under DDP each rank takes every ``world``-th batch and the moments are summed over ranks, so
    the scale uses every rank's batches and equals the single-process one.
    """
    n = len(latents.mean)
    order = BatchOrder(n, min(batch_size, n), seed)
    gen = torch.Generator().manual_seed(seed)
    moments = torch.zeros(3, dtype=torch.float64)  # sum, sum of squares, count
    for i in range(min(batches, math.ceil(n / order.batch_size))):
        z = latents.sample(order.next(), gen).double()  # every rank draws, to share the stream
        if i % d.world == d.rank:
            moments += torch.stack([z.sum(), z.pow(2).sum(), torch.tensor(float(z.numel()))])
    total, total_sq, count = all_sum(moments, d).tolist()
    var = total_sq / count - (total / count) ** 2
    if not var > 0:
        raise CheckpointError("the autoencoder's latents have zero variance; retrain stage 1")
    return 1.0 / math.sqrt(var)
