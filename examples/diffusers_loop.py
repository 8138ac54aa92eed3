"""A plain diffusers training loop (UNet2DModel + DDPMScheduler) with ldmkit's vital signs.

Nothing here is ldmkit's trainer: the loop is diffusers' own, as in its unconditional training
example. Five lines hand its tensors to ``ldmkit.VitalsMonitor``, which logs the guide's metrics
and prints findings live; afterwards ``ldmkit diagnose``, ``ldmkit report`` and ``ldmkit watch``
read the log directory.

The "latents" are sklearn's 8x8 digits upsampled to 16x16 and scaled to unit variance (a
pixel-space stand-in that runs in seconds on a CPU); with a VAE, pass
``vae.encode(x).latent_dist.sample() * scale`` instead.

    pip install diffusers   # or: pip install -e '.[dev]'
    python examples/diffusers_loop.py --steps 400 --log-dir runs/diffusers-example
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from sklearn.datasets import load_digits

from ldmkit import VitalsMonitor, normalize_timesteps


def digits(size: int = 16) -> torch.Tensor:
    x = torch.tensor(load_digits().images, dtype=torch.float32).unsqueeze(1) / 16.0
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False) * 2 - 1


@torch.no_grad()
def sample(model: UNet2DModel, train_scheduler: DDPMScheduler, n: int, steps: int,
           seed: int = 0) -> torch.Tensor:
    scheduler = DDIMScheduler.from_config(train_scheduler.config)
    scheduler.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n, 1, model.config.sample_size, model.config.sample_size), generator=gen)
    model.eval()
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t).sample, t, x).prev_sample
    model.train()
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--sample-every", type=int, default=200)
    parser.add_argument("--log-dir", default="runs/diffusers-example")
    args = parser.parse_args()

    torch.manual_seed(0)
    images = digits()
    scale = 1.0 / images.std().item()  # unit-variance "latents", as a VAE scaling factor does
    model = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, layers_per_block=1,
                        block_out_channels=(32, 64), norm_num_groups=8,
                        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    T = noise_scheduler.config.num_train_timesteps

    with VitalsMonitor(args.log_dir, latent_scale_factor=scale, log_every=args.log_every) as vitals:
        for step in range(1, args.steps + 1):
            z = images[torch.randint(len(images), (args.batch_size,))] * scale
            noise = torch.randn_like(z)
            timesteps = torch.randint(0, T, (z.shape[0],))
            noise_pred = model(noise_scheduler.add_noise(z, noise, timesteps), timesteps).sample
            loss = F.mse_loss(noise_pred, noise)
            opt.zero_grad()
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            vitals.observe_train_step(step, loss, noise_pred, noise,
                                      normalize_timesteps(timesteps, T), z, grad_norm,
                                      opt.param_groups[0]["lr"])
            if step % args.sample_every == 0 or step == args.steps:
                vitals.observe_samples(step, sample(model, noise_scheduler, 32, 25) / scale)
        print(f"scenario: {vitals.scenario()}")
        for f in vitals.findings:
            print(f"{f.severity} {f.code}: {f.message}. Fix: {f.fix}")
    print(f"logs: {args.log_dir} (try `ldmkit report {args.log_dir}`)")


if __name__ == "__main__":
    main()
