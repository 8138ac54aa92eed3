"""Stage 2 training: the diffusion loop.

Every ``log_every`` steps the guide's train vitals are logged as interval means of the exact
tensors of each step (``ldmkit.vitals.metrics``); every ``sample_every`` steps and at the end the
EMA model samples and the sample vitals are logged. A step whose loss or gradient is not finite
is never applied to the weights; ``vitals.on_nonfinite`` says whether to skip it, roll back to
the last checkpoint with a lower learning rate, or stop. SIGTERM/SIGINT end the run after the
current step with a checkpoint (``ldmkit.platform.preemption``); the loop state a checkpoint holds is
``ldmkit.training.state``, what a resume may change ``ldmkit.training.resume``.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from ldmkit.config import Config, to_yaml
from ldmkit.config.schedule import lr_at
from ldmkit.data.latents import LazyData, prepare_latents
from ldmkit.data.sources import BatchOrder
from ldmkit.data.stage1 import LatentPosteriors
from ldmkit.diffusion.condition import LABELS, Cond, dropped
from ldmkit.diffusion.parameterization import Parameterization
from ldmkit.diffusion.schedule import sample_t
from ldmkit.errors import ConfigError
from ldmkit.models.autoencoder import Autoencoder
from ldmkit.models.registry import build_backbone
from ldmkit.platform.distributed import (
    Dist,
    barrier,
    init_distributed,
    shard,
    shard_size,
    shutdown,
)
from ldmkit.platform.fastpath import Compiled, choose, record
from ldmkit.platform.files import write_text_atomic
from ldmkit.platform.preemption import Preempted, StopRequest
from ldmkit.run.context import context_of
from ldmkit.run.layout import RunDir
from ldmkit.sampling.evaluate import InLoopEval
from ldmkit.sampling.generate import (
    guidance_finding,
    parameterization,
)
from ldmkit.sampling.trained import run_backbone
from ldmkit.training import held_out
from ldmkit.training.divergence import (
    announce,
    is_abnormal,
    locate_nonfinite,
    on_nonfinite,
    origin_finding,
)
from ldmkit.training.optim import EMA, build_optimizer, set_lr
from ldmkit.training.outputs import StepOutputs, sample_and_log
from ldmkit.training.resume import OpenedRun
from ldmkit.training.runtime import (
    Runtime,
    announce_stop,
    attach_monitor,
    check_vae_scale,
    forward_model,
    should_stop,
)
from ldmkit.training.start import resolve_device, start_run
from ldmkit.training.state import (
    LoopState,
    restore_state,
    rewind_findings,
    save_state,
)
from ldmkit.training.step import cond_gap, global_vitals, train_step
from ldmkit.vitals import metrics as vm
from ldmkit.vitals.diagnose import Finding, coverage, scenario
from ldmkit.vitals.logs.metrics_jsonl import MetricLogger
from ldmkit.vitals.signs import StepAccumulator

__all__ = ["TrainResult", "train", "train_step"]


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
    rank: int = 0
    covers: str | None = None  # the scenario in words, saying what it covers

    @property
    def verdict(self) -> str:
        return self.covers or self.scenario


@dataclass
class Batch:
    """One step's draw, this rank's shard, on the device."""

    index: torch.Tensor  # [B] dataset rows of the global batch
    z: torch.Tensor  # scaled latents
    t: torch.Tensor
    eps: torch.Tensor
    cond: Cond  # diffusion/condition.py: the labels, some dropped to the null class
    # conditioning/cond_gap's probe (host views, moved only when measured): the global batch's
    # first samples (z, t, eps) with their labels before dropping, the same for any number of
    # processes; None: unconditional
    probe: tuple[torch.Tensor, torch.Tensor, torch.Tensor, Cond] | None = None


def draw_batch(state: LoopState, train_rows: torch.Tensor, latents: LatentPosteriors,
               scale: float, cfg: Config, d: Dist, device: torch.device) -> Batch:
    """The next batch; every rank draws the whole batch (the same numbers) and keeps its shard.
    An unconditional model's draws are exactly those of a run before conditioning existed."""
    index = train_rows[state.order.next()]
    z = scale * latents.sample(index, state.gen)
    t = sample_t(len(index), cfg.diffusion.t_sampling, state.gen,
                 cfg.diffusion.logit_normal_loc, cfg.diffusion.logit_normal_scale)
    eps = torch.randn(z.shape, generator=state.gen)
    given = {}
    if cfg.model.num_classes and latents.labels is not None:
        given = {LABELS: latents.labels[index]}
    cond = dropped(given, cfg.train.cond_drop_prob, state.gen)
    n = vm.COND_GAP_SAMPLES
    probe = (z[:n], t[:n], eps[:n], {k: v[:n] for k, v in given.items()}) if given else None
    z, t, eps = (shard(x, d).to(device, non_blocking=True) for x in (z, t, eps))
    return Batch(index, z, t, eps, {k: shard(v, d).to(device) for k, v in cond.items()}, probe)


def train(cfg: Config, run_dir: Path | None = None, resume: bool = False,
          stop_at: int | None = None, param: Parameterization | None = None) -> TrainResult:
    """Train stage 2 (and stage 1 unless reused), or continue ``run_dir`` from its last checkpoint.

    ``resume`` (or a ``run_dir`` that already holds this config's run) continues it. ``stop_at``
    ends after that many total steps with a checkpoint (a time-sliced job). ``param`` is the
    training loss's parameterization instead of the config's: an extension point for an
    objective the config cannot name (the diagnosis tests plant their faults through a
    subclass); validation and sampling keep the config's, which the checkpoint records. Under
    torchrun every rank calls this.
    """
    d = init_distributed(cfg.device)
    try:
        return _train(cfg, run_dir, resume, stop_at, param, d)
    finally:
        shutdown(d)


def _train(cfg: Config, run_dir: Path | None, resume: bool, stop_at: int | None,
           param: Parameterization | None, d: Dist) -> TrainResult:
    started, data = time.time(), LazyData(cfg.data, cfg.model.num_classes)
    per_rank = shard_size(cfg.train.batch_size, d, "train.batch_size")  # fails early
    if per_rank % cfg.train.grad_accum_steps:
        raise ConfigError(f"each of the {d.world} processes' {per_rank} samples per step must "
                          f"split into train.grad_accum_steps = {cfg.train.grad_accum_steps} "
                          "equal micro-batches; change either")
    with start_run(cfg, run_dir, resume, data, d) as opened, \
            MetricLogger(opened.run_dir, cfg.tensorboard, enabled=d.is_main) as logger, \
            StopRequest() as stop:
        tc, device = opened.cfg.train, resolve_device(opened.cfg.device, d)
        rt = Runtime(d, device, logger, stop, channels_last=tc.channels_last,
                     fast=choose(tc.precision, tc.compile, device, "train", tc.steps))
        torch.manual_seed(opened.cfg.seed)
        try:
            ae, latents, scale = prepare_latents(opened.cfg, opened.run_dir, logger, stop, d, data)
        except Preempted as exc:
            if d.is_main:
                tqdm.write(f"[ldmkit] {exc}; stage 1 restarts on resume: `ldmkit train --resume "
                           f"{opened.run_dir}`")
            return TrainResult(opened.run_dir, 0, float("nan"), {}, None, time.time() - started,
                               preempted_by=exc.signal_name, rank=d.rank)
        return _diffusion(opened, ae, latents, scale, rt, stop_at, param, started)


def _start_state(opened: OpenedRun, cfg: Config, ae: Autoencoder, latents: LatentPosteriors,
                 n_train: int, calibrated: bool, rt: Runtime) -> LoopState:
    """A fresh loop state, or the checkpoint's; logs rewound to it and the monitor attached."""
    tc, run_dir, scale = cfg.train, opened.run_dir, cfg.diffusion.latent_scale_factor
    spec = run_backbone(cfg, ae)
    # stage 2 draws from its own seed, not from where stage 1 (trained, or reused after a
    # kill) left torch's generator: a resume that skips stage 1 builds the same network
    torch.manual_seed(cfg.seed * 1_000_003 + 9)
    model = build_backbone(spec).to(rt.device)
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
    state = LoopState(model, EMA(model, tc.ema_decay), build_optimizer(model, tc),
                      torch.Generator().manual_seed(cfg.seed + 4),
                      BatchOrder(n_train, tc.batch_size, cfg.seed + 5),
                      StepAccumulator(), spec)
    if opened.ckpt is not None:
        restore_state(opened.ckpt, state)
        if rt.d.is_main:
            print(f"resumed from {opened.ckpt} at step {state.step}")
    if not rt.d.is_main:
        return state
    if opened.continuing:  # only now that the checkpoint loaded: forget redone steps
        rt.logger.rewind(state.step if opened.ckpt else -1)
        rewind_findings(run_dir, state.step if opened.ckpt else -1)
    write_text_atomic(RunDir(run_dir).config, to_yaml(cfg))
    record(RunDir(run_dir).fastpath, "train", state.step, rt.fast, tqdm.write)
    rt.monitor = attach_monitor(cfg, run_dir, rt.logger, scale, state.step)
    if state.step == 0:
        reach = vm.data_latent_extreme(latents.mean, latents.logvar,
                                       torch.Generator().manual_seed(cfg.seed + 6))
        rt.logger.log(0, {vm.SCALE_FACTOR: scale, vm.DATA_EXTREME: reach})
        if calibrated and rt.monitor is not None:
            check_vae_scale(ae, scale, rt.monitor)
        warning = guidance_finding(cfg, cfg.model.num_classes, cfg.sample.guidance_scale, 0)
        if warning is not None and rt.monitor is not None:
            rt.monitor.record(warning, 0)
    if cfg.vitals.on_nonfinite != "skip" and opened.ckpt is None:
        save_state(run_dir, cfg, state)  # the run's start: healthy weights to go back to
    return state


def _network(model: torch.nn.Module, rt: Runtime, run_dir: Path, state: LoopState
             ) -> tuple[DDP | None, Compiled]:
    """The training step's network: DDP-wrapped under torchrun, compiled where it pays (the
    checkpoints save ``model`` itself, so no wrapper's prefix reaches them). A compilation that
    fails is recorded in ``fastpath.jsonl`` as what ran: eager."""
    ddp = DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None) \
        if rt.d.active else None
    fell_back = (lambda fast: record(RunDir(run_dir).fastpath, "train", state.step, fast,
                                     lambda _: None)) if rt.d.is_main else None
    return ddp, Compiled(ddp or model, rt.fast, tqdm.write, on_fall_back=fell_back)


def _validate(state: LoopState, vset: held_out.ValidationSet | None, rt: Runtime,
              param: Parameterization, scale: float) -> None:
    """Log the deterministic validation loss of the current raw and EMA weights (rank 0)."""
    if vset is not None:
        rt.logger.log(state.step, held_out.measure(
            state.model, state.ema.model, lambda net: forward_model(net, rt), param, vset,
            scale))


def _diffusion(opened: OpenedRun, ae: Autoencoder, latents: LatentPosteriors, scale: float,
               rt: Runtime, stop_at: int | None, step_param: Parameterization | None,
               started: float) -> TrainResult:
    """Stage 2: the loop, then the final samples."""
    d, run_dir = rt.d, opened.run_dir
    calibrated = opened.cfg.diffusion.latent_scale_factor is None
    cfg = dataclasses.replace(opened.cfg, diffusion=dataclasses.replace(
        opened.cfg.diffusion, latent_scale_factor=scale))
    tc = cfg.train
    parts = held_out.run_split(cfg, run_dir, latents, d.is_main)
    state = _start_state(opened, cfg, ae, latents, len(parts.train), calibrated, rt)
    vset = held_out.prepare(cfg, run_dir, parts, latents, ae) if d.is_main else None
    # decoding up to 16k training images takes seconds (17 s for MNIST): at the first sampling
    reference = functools.cache(functools.partial(
        vm.CopyReference.of, ae.decode, latents.mean, parts.train, cfg.seed))
    evaluator = InLoopEval.of(cfg.data, parts.train, d, tqdm.write) if tc.eval_every else None
    model = state.model
    ddp, compiled = _network(model, rt, run_dir, state)
    net, params = forward_model(compiled, rt), list(model.parameters())
    scratch = [torch.empty_like(p) for p in params]  # the weights before a measured update
    ratio_every = vm.update_ratio_every(tc.log_every)
    param, first_step = parameterization(cfg), state.step
    step_param = step_param or param
    explode = context_of(cfg, scale).thr("grad_norm_high")
    end = min(tc.steps, stop_at) if stop_at else tc.steps
    grid, vitals, stopped_by, halted, previous_applied = None, {}, None, False, True
    bar = tqdm(total=tc.steps, initial=state.step, desc="diffusion", dynamic_ncols=True,
               mininterval=1.0, disable=not d.is_main)
    model.train()
    if state.step == 0:  # the untrained model's: where each noise level starts from
        _validate(state, vset, rt, param, scale)
    outputs = StepOutputs(cfg, ae, scale, rt, run_dir, reference, evaluator)
    state.pending = outputs.make(state, state.pending)  # what a stop cut short, made now
    while state.step < end:
        lr = lr_at(state.step, tc) * state.lr_scale
        set_lr(state.opt, lr)
        b = draw_batch(state, parts.train, latents, scale, cfg, d, rt.device)
        measure = scratch if state.step % ratio_every == 0 else None
        applied, step_vitals = compiled.run(train_step, net, params, state.opt, step_param,
                                            b.z, b.t, b.eps, tc.grad_clip, measure,
                                            tc.grad_accum_steps, ddp.no_sync if ddp else None,
                                            b.cond)
        step_vitals = global_vitals(step_vitals, b.z, d)
        first_bad, previous_applied = not applied and previous_applied, applied
        abnormal = is_abnormal(applied, step_vitals[vm.GRAD_NORM], explode)
        state.sick_since = (state.sick_since or state.step + 1) if abnormal else None
        if applied:
            state.ema.update(model)
        else:
            state.nonfinite += 1
            if first_bad and d.is_main:  # the first of a run of non-finite steps: where from?
                origin = locate_nonfinite(model, forward_model(model, rt), b.z, b.t, b.index,
                                          rt.bf16, latents.describe, b.cond)
                announce(rt, origin_finding(origin, state.step + 1,
                                            float(step_vitals[vm.LOSS]), lr), state.step)
            if cfg.vitals.on_nonfinite != "skip":
                event = on_nonfinite(cfg, run_dir, state, step_vitals, lr, rt)
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
            if b.probe is not None and d.is_main:  # rank 0 alone logs it
                vitals[vm.COND_GAP] = cond_gap(forward_model(model, rt), param, *b.probe,
                                               rt.device)
            if state.lr_scale != 1.0:
                vitals[vm.LR_SCALE] = state.lr_scale
            rt.logger.log(step, vitals)
            bar.set_postfix(loss=f"{vitals[vm.LOSS]:.4f}", cos=f"{vitals[vm.COS_EPS]:.2f}")
        if tc.val_every and (step % tc.val_every == 0 or step == tc.steps):
            _validate(state, vset, rt, param, scale)
        state.pending = outputs.make(state, outputs.due(step))
        halt = should_stop(rt, step, tc, end)
        stopped_by = rt.monitor.stop_finding if rt.monitor else None
        if (step % tc.checkpoint_every == 0 or step == end or halt) and d.is_main:
            save_state(run_dir, cfg, state)
        if halt:
            announce_stop(run_dir, step, stopped_by, rt.stop, d, repairing=rt.repairing(stopped_by))
            halted = True
            break
    bar.close()
    final_missing = not (RunDir(run_dir).samples(None) / "grid.png").is_file()
    if state.step >= tc.steps and not (stopped_by or halted) \
            and (state.step > first_step or final_missing):
        try:
            grid, sample_vitals = sample_and_log(cfg, state.step, state.ema, ae, scale, rt,
                                                 RunDir(run_dir).samples(None), cfg.sample.num,
                                                 True, reference)
            vitals = {**vitals, **sample_vitals}
        except Preempted:
            announce_stop(run_dir, state.step, None, rt.stop, d, "during the final sampling")
    barrier(d)
    monitor = rt.monitor
    findings = monitor.active() if monitor else []
    if stopped_by and stopped_by not in findings:
        findings.append(stopped_by)
    verdict = scenario(findings, monitor.series, monitor.ctx) if monitor else "unknown"
    return TrainResult(run_dir, state.step, scale, vitals, grid, time.time() - started,
                       findings, verdict, stopped_by,
                       rt.stop.signal_name if not stopped_by else None, d.rank,
                       coverage(verdict, monitor.series) if monitor else None)
