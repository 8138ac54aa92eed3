"""Stage 2 training: the diffusion loop.

Every ``log_every`` steps the guide's train vitals are logged as interval means of the exact
tensors of each step (``ldmkit.vitals.metrics``); every ``sample_every`` steps and at the end the
EMA model samples and the sample vitals are logged. A step whose loss or gradient is not finite
is never applied to the weights; ``vitals.on_nonfinite`` says whether to skip it, roll back to
the last checkpoint with a lower learning rate, or stop. SIGTERM/SIGINT end the run after the
current step with a checkpoint (``ldmkit.preemption``); checkpoints and resume are in
``ldmkit.resume``.
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

from ldmkit.checkpoint import latest_checkpoint, load_checkpoint, split_prefix
from ldmkit.config import Config, from_dict, to_yaml
from ldmkit.data import BatchOrder, load_data
from ldmkit.diffusion.losses import EpsModel, eps_mse_loss
from ldmkit.diffusion.schedule import CosineSchedule, sample_t
from ldmkit.errors import CheckpointError
from ldmkit.logging import MetricLogger, read_metrics
from ldmkit.models.autoencoder import Autoencoder
from ldmkit.models.unet import UNet
from ldmkit.optim import EMA, build_optimizer, lr_at, set_lr
from ldmkit.preemption import Preempted, StopRequest
from ldmkit.resume import (
    CONFIG_FILE,
    LoopState,
    last_checkpoint_or_none,
    open_run,
    restore_state,
    rewind_findings,
    save_state,
)
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
from ldmkit.vitals.diagnose import Context, Finding, event_finding, scenario
from ldmkit.vitals.monitor import LiveMonitor
from ldmkit.vitals.rules import threshold_defaults

__all__ = ["Fault", "TrainResult", "train", "train_step"]


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
    preempted_by: str | None = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_unet(cfg: Config, latent_channels: int, latent_size: int) -> UNet:
    u = cfg.unet
    return UNet(latent_channels, latent_size, u.base_channels, u.channel_mult, u.num_res_blocks,
                u.attention_resolutions, u.num_heads, u.dropout)


def prepare_latents(cfg: Config, run_dir: Path, logger: MetricLogger,
                    stop: StopRequest | None = None) -> tuple[Autoencoder, LatentPosteriors, float]:
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
        ae = train_autoencoder(cfg, data, run_dir, logger, stop)
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


def attach_monitor(cfg: Config, run_dir: Path, logger: MetricLogger, scale: float,
                   step: int) -> LiveMonitor | None:
    """Live diagnosis on every value the logger writes from here on (guide rules, vitals/)."""
    if not cfg.vitals.enabled:
        return None
    ctx = Context({**threshold_defaults(), **cfg.vitals.thresholds}, scale, cfg.train)
    monitor = LiveMonitor(run_dir, ctx, cfg.vitals.on_critical, echo=tqdm.write)
    if step > 0:
        monitor.prime(_series_until(logger, step))
    monitor.text_sink = logger.log_text
    logger.observers.append(monitor)
    return monitor


def _series_until(logger: MetricLogger, step: int) -> dict[str, list[tuple[int, float]]]:
    earlier: dict[str, list[tuple[int, float]]] = {}
    for rec in read_metrics(logger.path):
        if rec["step"] <= step:
            earlier.setdefault(rec["tag"], []).append((rec["step"], rec["value"]))
    return earlier


def sample_and_log(cfg: Config, step: int, ema: EMA, ae: Autoencoder, scale: float,
                   logger: MetricLogger, out: Path, num: int, singles: bool) -> tuple[Path, dict]:
    s = cfg.sample
    samples = generate(ema.model, ae, scale, cfg, num, s.sampler, s.steps, s.seed, s.eta)
    logger.log(step, samples.vitals)
    return save_samples(samples, out, singles), samples.vitals


def on_nonfinite(cfg: Config, run_dir: Path, state: LoopState, value: float,
                 logger: MetricLogger, monitor: LiveMonitor | None) -> Finding:
    """Act on a step that was not applied (``vitals.on_nonfinite`` = rollback or stop).

    Rollback restores the last checkpoint, rewinds the logs to it and scales the learning rate;
    the event is recorded at the checkpoint's step so a later rewind keeps it. Returns the
    event's finding: critical when training must stop.
    """
    vc, diverged_at = cfg.vitals, state.step + 1
    fields = {"n": state.rollbacks, "max": vc.max_rollbacks, "lr_scale": state.lr_scale,
              "lr": cfg.train.lr * state.lr_scale * 0.1}
    if vc.on_nonfinite == "stop":
        save_state(run_dir, cfg, state)
        finding = event_finding("nonfinite_stop", diverged_at, value, **fields)
    elif state.rollbacks >= vc.max_rollbacks:
        finding = event_finding("rollback_exhausted", diverged_at, value, **fields)
    else:
        ckpt = latest_checkpoint(run_dir)
        rollbacks, lr_scale = state.rollbacks + 1, state.lr_scale * vc.rollback_lr_factor
        restore_state(ckpt, state)
        state.rollbacks, state.lr_scale = rollbacks, lr_scale
        logger.rewind(state.step)
        rewind_findings(run_dir, state.step)
        if monitor is not None:
            monitor.prime(_series_until(logger, state.step))
        finding = event_finding("nonfinite_rollback", diverged_at, value, to=state.step,
                                n=rollbacks, max=vc.max_rollbacks, lr_scale=lr_scale,
                                lr=cfg.train.lr * lr_scale)
    at_step = state.step
    if monitor is not None:
        monitor.record(finding, at_step)
    else:
        tqdm.write(f"[vitals] {finding.severity.upper()} {finding.code}: {finding.message}")
    return finding


def _preempted(run_dir: Path, stop: StopRequest, step: int) -> None:
    tqdm.write(f"[ldmkit] {stop.signal_name}: stopped after step {step} with a checkpoint; "
               f"resume with `ldmkit train --resume {run_dir}` (or rerun the same command)")


def train(cfg: Config, run_dir: Path | None = None, resume: bool = False,
          stop_at: int | None = None, fault: Fault | None = None) -> TrainResult:
    """Train stage 2 (and stage 1 unless reused), or continue ``run_dir`` from its last checkpoint.

    ``resume`` (or a ``run_dir`` that already holds this config's run) continues it. ``stop_at``
    ends after that many total steps with a checkpoint, as a preemption would. ``fault`` plants a
    defect in every step (tests of the diagnosis only).
    """
    started = time.time()
    run_dir, cfg, continuing = open_run(cfg, run_dir and Path(run_dir), resume)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = last_checkpoint_or_none(run_dir) if continuing else None
    if not continuing:
        (run_dir / CONFIG_FILE).write_text(to_yaml(cfg))
    print(f"run directory: {run_dir}\n--- config ---\n{to_yaml(cfg)}--------------")
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    tc = cfg.train
    with MetricLogger(run_dir, cfg.tensorboard) as logger, StopRequest() as stop:
        try:
            ae, latents, scale = prepare_latents(cfg, run_dir, logger, stop)
        except Preempted as exc:
            tqdm.write(f"[ldmkit] {exc}; stage 1 restarts on resume: `ldmkit train --resume "
                       f"{run_dir}`")
            return TrainResult(run_dir, 0, float("nan"), {}, None, time.time() - started,
                               preempted_by=exc.signal_name)
        cfg = dataclasses.replace(cfg, diffusion=dataclasses.replace(
            cfg.diffusion, latent_scale_factor=scale))
        model = build_unet(cfg, ae.latent_channels, latents.mean.shape[-1]).to(device)
        state = LoopState(model, EMA(model, tc.ema_decay), build_optimizer(model, tc),
                          torch.Generator().manual_seed(cfg.seed + 4),
                          BatchOrder(len(latents.mean), tc.batch_size, cfg.seed + 5),
                          vm.StepAccumulator())
        if ckpt is not None:
            restore_state(ckpt, state)
            print(f"resumed from {ckpt} at step {state.step}")
        if continuing:  # only now that the checkpoint loaded: forget the steps to be redone
            logger.rewind(state.step if ckpt else -1)
            rewind_findings(run_dir, state.step if ckpt else -1)
        (run_dir / CONFIG_FILE).write_text(to_yaml(cfg))
        first_step = state.step
        monitor = attach_monitor(cfg, run_dir, logger, scale, state.step)
        if state.step == 0:
            logger.log(0, {vm.SCALE_FACTOR: scale})
        if cfg.vitals.on_nonfinite == "rollback" and ckpt is None:
            save_state(run_dir, cfg, state)  # something to roll back to
        schedule = schedule_of(cfg)
        end = min(tc.steps, stop_at) if stop_at else tc.steps
        grid, vitals, stopped_by = None, {}, None
        bar = tqdm(total=tc.steps, initial=state.step, desc="diffusion", dynamic_ncols=True,
                   mininterval=1.0)
        model.train()
        while state.step < end:
            lr = lr_at(state.step, tc) * state.lr_scale
            set_lr(state.opt, lr)
            index = state.order.next()
            z = (scale * latents.sample(index, state.gen)).to(device)
            t = sample_t(len(index), cfg.diffusion.t_sampling, state.gen,
                         cfg.diffusion.logit_normal_loc, cfg.diffusion.logit_normal_scale).to(device)
            eps = torch.randn(z.shape, generator=state.gen).to(device)
            applied, step_vitals = train_step(model, state.opt, schedule, z, t, eps, tc.grad_clip,
                                              fault)
            if applied:
                state.ema.update(model)
            else:
                state.nonfinite += 1
                if cfg.vitals.on_nonfinite != "skip":
                    event = on_nonfinite(cfg, run_dir, state, float(step_vitals[vm.LOSS]),
                                         logger, monitor)
                    if event.severity == "critical":
                        stopped_by = event
                        break
                    bar.reset(total=tc.steps)
                    bar.update(state.step)
                    continue
            state.acc.add(step_vitals)
            state.step += 1
            bar.update(1)
            step = state.step
            if step % tc.log_every == 0 or step == end:
                vitals = {**state.acc.read(), vm.LEARNING_RATE: lr,
                          vm.NONFINITE_STEPS: state.nonfinite}
                if state.lr_scale != 1.0:
                    vitals[vm.LR_SCALE] = state.lr_scale
                logger.log(step, vitals)
                bar.set_postfix(loss=f"{vitals[vm.LOSS]:.4f}", cos=f"{vitals[vm.COS_EPS]:.2f}")
            if step % tc.sample_every == 0 and step < tc.steps:
                sample_and_log(cfg, step, state.ema, ae, scale, logger,
                               run_dir / "samples" / f"step_{step:07d}",
                               cfg.sample.during_training_num, False)
            stopped_by = monitor.stop_finding if monitor else None
            if step % tc.checkpoint_every == 0 or step == end or stopped_by or stop.requested:
                save_state(run_dir, cfg, state)
            if stopped_by:
                tqdm.write(f"[vitals] stopping at step {step} (vitals.on_critical=stop): "
                           f"{stopped_by.code}. Checkpoint saved; resume with `ldmkit train "
                           f"--resume {run_dir}` after the fix: {stopped_by.fix}")
                break
            if stop.requested:
                _preempted(run_dir, stop, step)
                break
        bar.close()
        final_missing = not (run_dir / "samples" / "final" / "grid.png").is_file()
        if state.step >= tc.steps and not stopped_by and (state.step > first_step or final_missing):
            grid, sample_vitals = sample_and_log(cfg, state.step, state.ema, ae, scale, logger,
                                                 run_dir / "samples" / "final", cfg.sample.num,
                                                 True)
            vitals = {**vitals, **sample_vitals}
        findings = monitor.active() if monitor else []
        if stopped_by and stopped_by not in findings:
            findings.append(stopped_by)
        verdict = scenario(findings, monitor.series, monitor.ctx) if monitor else "unknown"
    return TrainResult(run_dir, state.step, scale, vitals, grid, time.time() - started,
                       findings, verdict, stopped_by, stop.signal_name)


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
