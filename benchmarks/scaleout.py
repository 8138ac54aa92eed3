"""Latent cache speed-up and 1 vs 2 process (torchrun, gloo) training throughput.

Run: ``.venv/bin/python benchmarks/scaleout.py`` (part of ``make bench``). Uses the demo's
model sizes (configs/digits.yaml) so the figures describe the main job.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import machine, write_section  # noqa: E402

from ldmkit.config import load_config  # noqa: E402
from ldmkit.data.latents import build_cache, cache_meta, encode_in_memory, read_cache  # noqa: E402
from ldmkit.data.sources import BatchOrder, load_data  # noqa: E402
from ldmkit.data.stage1 import build_autoencoder, save_autoencoder  # noqa: E402
from ldmkit.diffusion.schedule import sample_t  # noqa: E402
from ldmkit.models.registry import backbone_spec, build_backbone  # noqa: E402
from ldmkit.sampling.generate import parameterization  # noqa: E402
from ldmkit.training.loop import train, train_step  # noqa: E402
from ldmkit.training.optim import build_optimizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REPEATS = 3
STEPS = 20


def median_time(fn, repeats: int = REPEATS) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cache_speedup(tmp: Path) -> str:
    cfg = load_config(ROOT / "configs/digits.yaml")
    ae = build_autoencoder(cfg.autoencoder, cfg.data.channels).eval().requires_grad_(False)
    save_autoencoder(ae, cfg.autoencoder, cfg.data.channels, tmp / "run" / "autoencoder")
    data = load_data(cfg.data)
    meta = cache_meta(cfg, tmp / "run" / "autoencoder")
    build_cache(ae, cfg, tmp / "cache", meta)
    startup_encode = median_time(lambda: encode_in_memory(ae, load_data(cfg.data)))
    startup_cache = median_time(lambda: read_cache(tmp / "cache", meta))
    latents = read_cache(tmp / "cache", meta)
    scale, bs = 1.0, cfg.train.batch_size
    model = build_backbone(backbone_spec(cfg.model, ae.latent_channels, latents.mean.shape[-1]))
    opt, params, schedule = build_optimizer(model, cfg.train), list(model.parameters()), parameterization(cfg)
    gen, order = torch.Generator().manual_seed(0), BatchOrder(len(data), bs, 0)

    def steps(encode_each_batch: bool) -> None:
        for _ in range(STEPS):
            index = order.next()
            if encode_each_batch:  # diffusers' train_text_to_image: vae.encode(...) every step
                with torch.no_grad():
                    z = ae.encode(data.batch(index)).sample(gen) * scale
            else:
                z = latents.sample(index, gen) * scale
            t = sample_t(bs, "uniform", gen)
            train_step(model, params, opt, schedule, z, t, torch.randn(z.shape, generator=gen), 1.0)

    steps(False)  # warm-up
    encoder_in_loop, cached = [], []
    for _ in range(REPEATS):  # alternate, so drift hits both equally
        encoder_in_loop.append(median_time(lambda: steps(True), 1) / STEPS)
        cached.append(median_time(lambda: steps(False), 1) / STEPS)
    e, c = statistics.median(encoder_in_loop), statistics.median(cached)
    return (f"| per training step (batch {bs}, demo UNet + autoencoder) | {e * 1e3:.0f} ms "
            f"(encoder in the loop) | {c * 1e3:.0f} ms (cache) | {e / c:.2f}x |\n"
            f"| start of stage 2 ({len(data)} digits) | {startup_encode * 1e3:.0f} ms "
            f"(load + encode) | {startup_cache * 1e3:.1f} ms (open the memory map) | "
            f"{startup_encode / startup_cache:.0f}x |")


def throughput(tmp: Path, ae_run: Path, nproc: int, steps: int) -> float:
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = yaml.safe_load((ROOT / "configs/digits.yaml").read_text())
    cfg["autoencoder"]["pretrained"] = str(ae_run)
    cfg["run_dir"] = str(tmp / f"p{nproc}-{steps}")
    cfg["tensorboard"] = False
    cfg["train"].update(steps=steps, sample_every=10**6, checkpoint_every=10**6)
    cfg["sample"].update(num=2, steps=1)
    path = tmp / f"p{nproc}-{steps}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // nproc))}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={nproc}", "-m", "ldmkit", "train", str(path)],
                   env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def process_scaling(tmp: Path) -> str:
    cfg = load_config(ROOT / "configs/digits.yaml", ["autoencoder.steps=1", "train.steps=1",
                                                     "tensorboard=false", "sample.num=2"])
    ae_run = train(cfg, tmp / "ae").run_dir
    rows, short, long = [], 20, 80
    for nproc in (1, 2):
        extra = statistics.median([throughput(tmp / f"{nproc}l{i}", ae_run, nproc, long)
                                   - throughput(tmp / f"{nproc}s{i}", ae_run, nproc, short)
                                   for i in range(2)])
        rate = (long - short) * 128 / extra
        rows.append((nproc, rate))
    base = rows[0][1]
    return "\n".join(f"| {n} | {r:.0f} latents/s | {r / base:.2f}x |" for n, r in rows)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cache = cache_speedup(Path(tmp))
        scaling = process_scaling(Path(tmp))
    body = f"""## Latent cache and processes (`benchmarks/scaleout.py`)

Machine: {machine()}. Command: `.venv/bin/python benchmarks/scaleout.py`.

The latent cache (`data.latent_cache`, `ldmkit encode`) stores the encoder's posterior once;
stage 2 samples `z ~ q(z|x)` from it instead of running the encoder on every batch.

| what | without the cache | with the cache | speed-up |
|---|---|---|---|
{cache}

Training throughput with `torchrun --standalone --nproc_per_node N -m ldmkit train` (gloo, CPU,
demo model, global batch 128, OMP threads = cores / N), from the time difference of an
80-step and a 20-step run (start-up excluded), median of 2:

| processes | throughput | vs 1 |
|---|---|---|
{scaling}

On 2 CPU cores, 2 processes share the same cores that 1 process already uses with 2 threads,
so no speed-up is expected here; the figure shows the cost of DDP's gradient all-reduce and the
per-step vital-sign all-reduce. On a multi-GPU machine each process has its own device.
"""
    write_section("scaleout", body)
    print(body)


if __name__ == "__main__":
    main()
