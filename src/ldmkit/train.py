"""Stage 2 training: the diffusion loop, its checkpoints, and resume.

Every ``log_every`` steps the guide's train vitals are logged as interval means of the exact
tensors of each step (``ldmkit.vitals.metrics``); every ``sample_every`` steps and at the end the
EMA model samples and the sample vitals are logged. A step whose loss or gradient is not finite
is never applied to the weights; it is counted in ``optimization/nonfinite_steps``.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from ldmkit.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    optimizer_from_flat,
    optimizer_to_flat,
    save_checkpoint,
    split_prefix,
    with_prefix,
)
from ldmkit.config import Config, from_dict, load_config, to_dict, to_yaml
from ldmkit.data import BatchOrder, load_data
from ldmkit.diffusion.losses import EpsModel, eps_mse_loss
from ldmkit.diffusion.schedule import CosineSchedule, sample_t
from ldmkit.errors import CheckpointError
from ldmkit.logging import MetricLogger, read_metrics
from ldmkit.models.autoencoder import Autoencoder
from ldmkit.models.unet import UNet
from ldmkit.optim import EMA, build_optimizer, lr_at, set_lr
from ldmkit.sample import generate, save_samples, schedule_of
from ldmkit.stage1 import (
    AE_DIR,
    LatentPosteriors,
    autoencoder_dir,
    calibrate_latent_scale,
    encode_dataset,
    load_autoencoder,
    train_autoencoder,
)
from ldmkit.vitals import metrics as vm
from ldmkit.vitals.diagnose import Context, Finding, scenario
from ldmkit.vitals.monitor import LiveMonitor
from ldmkit.vitals.rules import threshold_defaults

CONFIG_FILE = "config.yaml"


@dataclass(frozen=True)
class Fault:
    """A defect planted in every training step, for tests of the diagnosis where no config can
    produce the fault: ``eps_model(model, eps)`` replaces what the loss calls (e.g. a model that
    sees the noise), ``target(eps)`` replaces the regression target (e.g. a sign bug)."""

    eps_model: Callable[[nn.Module, torch.Tensor], EpsModel] | None = None
    target: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    latent_scale_factor: float
    vitals: dict[str, float]
    grid: Path | None
    seconds: float
    findings: list[Finding] = dataclasses.field(default_factory=list)
    scenario: str = "too_early"
    stopped_by: Finding | None = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def new_run_dir(cfg: Config, run_dir: Path | None = None) -> Path:
    """``run_dir``, ``cfg.run_dir`` or a fresh ``runs/<name>-<timestamp>``; never an existing run."""
    chosen = run_dir or (Path(cfg.run_dir) if cfg.run_dir else None)
    if chosen is not None:
        if (chosen / CONFIG_FILE).exists():
            raise CheckpointError(f"run directory '{chosen}' already holds a run; continue it with "
                                  f"`ldmkit train --resume {chosen}` or set another run_dir")
        return chosen
    stem = Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, i = stem, 1
    while path.exists():
        path, i = Path(f"{stem}-{i}"), i + 1
    return path


def load_run_config(run_dir: str | Path, overrides: list[str] | None = None) -> Config:
    """The resolved config a run was started with, plus ``--set`` overrides (e.g. more steps)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"'{run_dir}' is not an ldmkit run directory (no {CONFIG_FILE})")
    return load_config(path, overrides)


def build_unet(cfg: Config, latent_channels: int, latent_size: int) -> UNet:
    u = cfg.unet
    return UNet(latent_channels, latent_size, u.base_channels, u.channel_mult, u.num_res_blocks,
                u.attention_resolutions, u.num_heads, u.dropout)


def prepare_latents(cfg: Config, run_dir: Path,
                    logger: MetricLogger) -> tuple[Autoencoder, LatentPosteriors, float]:
    """Stage 1 (reuse or train), encode the dataset once, calibrate the latent scale."""
    data = load_data(cfg.data)
    print(f"data: {len(data)} images from {data.source}, {tuple(data.images.shape[1:])}")
    if data.skipped:
        print(f"data: skipped {data.skipped} unreadable images (first: {data.first_skipped})")
    if cfg.autoencoder.pretrained and not (run_dir / AE_DIR / "meta.json").is_file():
        ae = load_autoencoder(cfg.autoencoder.pretrained)
        # the run keeps its own copy, so sampling and resume never depend on an outside path
        shutil.copytree(autoencoder_dir(cfg.autoencoder.pretrained), run_dir / AE_DIR)
    elif (run_dir / AE_DIR / "meta.json").is_file():
        ae = load_autoencoder(run_dir / AE_DIR)
    else:
        ae = train_autoencoder(cfg, data, run_dir, logger)
    if ae.encoder.conv_in.in_channels != cfg.data.channels:
        raise CheckpointError(f"the autoencoder takes {ae.encoder.conv_in.in_channels}-channel "
                              f"images but data.channels is {cfg.data.channels}")
    latents = encode_dataset(ae, data)
    scale = cfg.diffusion.latent_scale_factor
    if scale is None:
        scale = calibrate_latent_scale(latents, cfg.autoencoder.calibration_batches,
                                       cfg.train.batch_size, cfg.seed + 3)
        print(f"latent_scale_factor calibrated: {scale:.4f}")
    return ae, latents, scale


def train_step(model: nn.Module, opt: torch.optim.Optimizer, schedule: CosineSchedule,
               z: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, grad_clip: float,
               fault: Fault | None = None) -> tuple[bool, dict[str, torch.Tensor]]:
    """One update; returns whether it was applied and the step's vitals (device tensors)."""
    eps_model = fault.eps_model(model, eps) if fault and fault.eps_model else model
    target = fault.target(eps) if fault and fault.target else None
    out = eps_mse_loss(eps_model, schedule, z, t, eps, target)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), grad_clip)  # norm before clipping
    finite = bool(torch.isfinite(out.loss) & torch.isfinite(grad_norm))
    if finite:
        opt.step()
    vitals = {vm.LOSS: out.loss.detach(), vm.GRAD_NORM: grad_norm.detach(),
              vm.T_MEAN: t.mean(), vm.COS_EPS: vm.cos_eps_mean(out.eps_pred.detach(), eps),
              vm.Z_STD: vm.latent_std(z)}
    return finite, vitals


def save_training_state(run_dir: Path, cfg: Config, step: int, model: nn.Module, ema: EMA,
                        opt: torch.optim.Optimizer, gen: torch.Generator, order: BatchOrder,
                        nonfinite: int) -> Path:
    optim_tensors, optim_meta = optimizer_to_flat(opt)
    weights = {**with_prefix(model.state_dict(), "model."),
               **with_prefix(ema.model.state_dict(), "ema.")}
    training = {**optim_tensors, "rng.train": gen.get_state(), "rng.torch": torch.get_rng_state()}
    meta = {"config": to_dict(cfg), "latent_scale_factor": cfg.diffusion.latent_scale_factor,
            "optimizer": optim_meta, "data_order": order.state(), "ema_updates": ema.updates,
            "nonfinite_steps": nonfinite}
    return save_checkpoint(run_dir / "checkpoints", step, weights, training, meta,
                           cfg.train.checkpoint_keep)


def restore_training_state(path: Path, model: nn.Module, ema: EMA, opt: torch.optim.Optimizer,
                           gen: torch.Generator) -> dict:
    weights, training, meta = load_checkpoint(path)
    try:
        model.load_state_dict(split_prefix(weights, "model."))
        ema.model.load_state_dict(split_prefix(weights, "ema."))
        optimizer_from_flat(opt, training, meta["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"checkpoint '{path}' does not match this config's model "
                              f"({str(exc).splitlines()[0]}); resume with the run's own config") from None
    gen.set_state(training["rng.train"])
    torch.set_rng_state(training["rng.torch"])
    ema.updates = meta["ema_updates"]
    return meta


def attach_monitor(cfg: Config, run_dir: Path, logger: MetricLogger, scale: float,
                   step: int) -> LiveMonitor | None:
    """Live diagnosis on every value the logger writes from here on (guide rules, vitals/)."""
    if not cfg.vitals.enabled:
        return None
    ctx = Context({**threshold_defaults(), **cfg.vitals.thresholds}, scale, cfg.train)
    monitor = LiveMonitor(run_dir, ctx, cfg.vitals.on_critical, echo=tqdm.write)
    if step > 0:
        earlier: dict[str, list[tuple[int, float]]] = {}
        for rec in read_metrics(logger.path):
            if rec["step"] <= step:
                earlier.setdefault(rec["tag"], []).append((rec["step"], rec["value"]))
        monitor.prime(earlier)
    monitor.text_sink = logger.log_text
    logger.observers.append(monitor)
    return monitor


def sample_and_log(cfg: Config, step: int, ema: EMA, ae: Autoencoder, scale: float,
                   logger: MetricLogger, out: Path, num: int, singles: bool) -> tuple[Path, dict]:
    s = cfg.sample
    samples = generate(ema.model, ae, scale, cfg, num, s.sampler, s.steps, s.seed, s.eta)
    logger.log(step, samples.vitals)
    return save_samples(samples, out, singles), samples.vitals


def train(cfg: Config, run_dir: Path | None = None, resume: bool = False,
          stop_at: int | None = None, fault: Fault | None = None) -> TrainResult:
    """Train stage 2 (and stage 1 unless reused); ``resume`` continues ``run_dir``'s last checkpoint.

    ``stop_at`` ends after that many total steps with a checkpoint, as a preemption would.
    ``fault`` plants a defect in every step (tests of the diagnosis only).
    """
    started = time.time()
    run_dir = Path(run_dir) if resume and run_dir else new_run_dir(cfg, run_dir and Path(run_dir))
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"run directory: {run_dir}\n--- config ---\n{to_yaml(cfg)}--------------")
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    tc = cfg.train
    with MetricLogger(run_dir, tensorboard=cfg.tensorboard) as logger:
        ae, latents, scale = prepare_latents(cfg, run_dir, logger)
        cfg = dataclasses.replace(cfg, diffusion=dataclasses.replace(
            cfg.diffusion, latent_scale_factor=scale))
        (run_dir / CONFIG_FILE).write_text(to_yaml(cfg))
        model = build_unet(cfg, ae.latent_channels, latents.mean.shape[-1]).to(device)
        ema = EMA(model, tc.ema_decay)
        opt = build_optimizer(model, tc)
        gen = torch.Generator().manual_seed(cfg.seed + 4)
        order = BatchOrder(len(latents.mean), tc.batch_size, cfg.seed + 5)
        step, nonfinite = 0, 0
        if resume and list_checkpoints(run_dir / "checkpoints"):
            ckpt = latest_checkpoint(run_dir)
            meta = restore_training_state(ckpt, model, ema, opt, gen)
            step, nonfinite = meta["step"], meta["nonfinite_steps"]
            order = BatchOrder(len(latents.mean), tc.batch_size, cfg.seed + 5,
                               **meta["data_order"])
            print(f"resumed from {ckpt} at step {step}")
        monitor = attach_monitor(cfg, run_dir, logger, scale, step)
        if step == 0:
            logger.log(0, {vm.SCALE_FACTOR: scale})
        schedule = schedule_of(cfg)
        acc = vm.StepAccumulator()
        end = min(tc.steps, stop_at) if stop_at else tc.steps
        grid, vitals = None, {}
        bar = tqdm(total=tc.steps, initial=step, desc="diffusion", dynamic_ncols=True,
                   mininterval=1.0)
        model.train()
        while step < end:
            lr = lr_at(step, tc)
            set_lr(opt, lr)
            index = order.next()
            z = (scale * latents.sample(index, gen)).to(device)
            t = sample_t(len(index), cfg.diffusion.t_sampling, gen, cfg.diffusion.logit_normal_loc,
                         cfg.diffusion.logit_normal_scale).to(device)
            eps = torch.randn(z.shape, generator=gen).to(device)
            applied, step_vitals = train_step(model, opt, schedule, z, t, eps, tc.grad_clip,
                                              fault)
            if applied:
                ema.update(model)
            else:
                nonfinite += 1
            acc.add(step_vitals)
            step += 1
            bar.update(1)
            if step % tc.log_every == 0 or step == end:
                vitals = {**acc.read(), vm.LEARNING_RATE: lr, vm.NONFINITE_STEPS: nonfinite}
                logger.log(step, vitals)
                bar.set_postfix(loss=f"{vitals[vm.LOSS]:.4f}", cos=f"{vitals[vm.COS_EPS]:.2f}")
            if step % tc.sample_every == 0 and step < tc.steps:
                sample_and_log(cfg, step, ema, ae, scale, logger,
                               run_dir / "samples" / f"step_{step:07d}",
                               cfg.sample.during_training_num, False)
            stop = monitor.stop_finding if monitor else None
            if step % tc.checkpoint_every == 0 or step == end or stop:
                save_training_state(run_dir, cfg, step, model, ema, opt, gen, order, nonfinite)
            if stop:
                tqdm.write(f"[vitals] stopping at step {step} (vitals.on_critical=stop): "
                           f"{stop.code}. Checkpoint saved; resume with `ldmkit train --resume "
                           f"{run_dir}` after the fix: {stop.fix}")
                break
        bar.close()
        if step >= tc.steps:
            grid, sample_vitals = sample_and_log(cfg, step, ema, ae, scale, logger,
                                                 run_dir / "samples" / "final", cfg.sample.num,
                                                 True)
            vitals = {**vitals, **sample_vitals}
        findings = monitor.active() if monitor else []
        series = monitor.series if monitor else {}
    return TrainResult(run_dir, step, scale, vitals, grid, time.time() - started, findings,
                       scenario(findings, series, monitor.ctx) if monitor else "unknown",
                       monitor.stop_finding if monitor else None)


def load_for_sampling(run_dir: Path) -> tuple[dict, int, nn.Module, Autoencoder, float]:
    """(config dict, step, EMA UNet, autoencoder, scale) of a run's last checkpoint."""
    ckpt = latest_checkpoint(run_dir)
    weights, _, meta = load_checkpoint(ckpt)
    cfg = from_dict(meta["config"])
    ae = load_autoencoder(run_dir / AE_DIR)
    size = cfg.data.image_size // ae.downsample_factor
    model = build_unet(cfg, ae.latent_channels, size)
    try:
        model.load_state_dict(split_prefix(weights, "ema."))
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint '{ckpt}' does not match its config: "
                              f"{str(exc).splitlines()[0]}") from None
    return meta["config"], meta["step"], model.eval(), ae, float(meta["latent_scale_factor"])
