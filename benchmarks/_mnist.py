"""What the MNIST benchmarks share: one autoencoder and latent cache, and the quality reference.

Stage 1 (``configs/mnist.yaml``'s autoencoder) is trained once into ``runs/bench-mnist/stage1``
and its posteriors cached in ``runs/bench-mnist/latents``; every diffusion model of the
benchmarks, ldmkit's and the diffusers reference alike, trains on those same cached latents
with the same calibrated scale and is decoded by the same decoder, so only stage 2 differs.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ldmkit.config import Config, load_config
from ldmkit.data.latents import prepare_latents
from ldmkit.data.sources import load_data
from ldmkit.data.stage1 import LatentPosteriors
from ldmkit.models.autoencoder import Autoencoder
from ldmkit.sampling.classifier import load_or_train
from ldmkit.sampling.evaluate import Reference
from ldmkit.vitals.logs.metrics_jsonl import MetricLogger

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/mnist.yaml"
DATA = ROOT.parent / "shared/data/mnist"
WORK = ROOT / "runs/bench-mnist"
STAGE1, CACHE = WORK / "stage1", WORK / "latents"
LDMKIT_20MIN = WORK / "ldmkit"  # the 20-minute ldmkit run that sampler_quality.py samples
EVAL_SEED = 1  # the same starting noise for every model and sampler


def config(*overrides: str) -> Config:
    """configs/mnist.yaml reading ../shared/data/mnist, sharing the benchmarks' stage 1."""
    if not DATA.is_dir():
        raise SystemExit(f"MNIST not found at {DATA}; put ../shared/data beside the repository")
    return load_config(CONFIG, [f"data.path={DATA}", f"data.latent_cache={CACHE}", *overrides])


@dataclass
class Setup:
    cfg: Config
    ae: Autoencoder
    latents: LatentPosteriors
    scale: float


def stage1() -> Setup:
    """Train (once) the autoencoder, encode MNIST into the cache, calibrate the scale."""
    cfg = config(f"run_dir={STAGE1}")
    STAGE1.mkdir(parents=True, exist_ok=True)
    with MetricLogger(STAGE1, tensorboard=False) as logger:
        ae, latents, scale = prepare_latents(cfg, STAGE1, logger)
    return Setup(cfg, ae, latents, scale)


def reference(cfg: Config, num: int) -> Reference:
    """MNIST's classifier (trained once, cached) with ``num`` test images and the training set."""
    clf, _, held_out = load_or_train(cfg.data)
    print(f"classifier: {clf.held_out_accuracy:.1%} accurate on the test split")
    return Reference.of(clf, held_out.images[:num], load_data(cfg.data).images)


def train_for(budget_s: float, run_dir: Path, config_path: Path, scale: float, steps: int,
              *sets: str, env: dict[str, str] | None = None) -> None:
    """``ldmkit train config_path`` on the shared stage 1 and cache, in a subprocess whose clock
    starts at launch, stopped with SIGTERM (it checkpoints) at ``budget_s``; its output in
    ``WORK/<run>.log``. ``steps`` sets where the cosine decay ends; ``env``: the subprocess's
    environment (default: this one's). fp32 eager unless ``sets`` say otherwise: the figures
    of these benchmarks were measured so, against fp32 reference loops."""
    cmd = [sys.executable, "-m", "ldmkit", "train", str(config_path)]
    for s in [f"run_dir={run_dir}", f"data.path={DATA}", f"data.latent_cache={CACHE}",
              f"autoencoder.pretrained={STAGE1}", f"diffusion.latent_scale_factor={scale}",
              f"train.steps={steps}", f"train.checkpoint_every={max(1, steps // 10)}",
              "train.sample_every=100000", "train.precision=fp32", "train.compile=false",
              *sets]:
        cmd += ["--set", s]
    with (WORK / f"{run_dir.name}.log").open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            proc.wait(timeout=budget_s)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            proc.wait()
    if proc.returncode != 0:
        raise SystemExit(f"{run_dir.name} failed (exit {proc.returncode}); see {log.name}")
