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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from ldmkit.conditioning.sources import ConditionSource
from ldmkit.config import Config, to_yaml
from ldmkit.config.schedule import lr_at
from ldmkit.data.latents import LazyData, prepare_latents
from ldmkit.data.sources import BatchOrder
from ldmkit.data.stage1 import LatentPosteriors
from ldmkit.diffusion.parameterization import Parameterization
from ldmkit.errors import ConfigError
from ldmkit.models.autoencoder import Autoencoder
from ldmkit.models.registry import build_backbone
from ldmkit.platform.distributed import (
    Dist,
    barrier,
    init_distributed,
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
from ldmkit.training.batch import draw_batch
from ldmkit.training.callbacks import (
    Callback,
    Checkpoints,
    IntervalLog,
    Outputs,
    StepEvent,
    StopCheck,
    Validation,
    dispatch,
)
from ldmkit.training.divergence import DivergenceGuard, apply_remedy
from ldmkit.training.forecasting import Forecast
from ldmkit.training.optim import EMA, build_optimizer, set_lr
from ldmkit.training.outputs import StepOutputs, sample_and_log
from ldmkit.training.resume import OpenedRun
from ldmkit.training.runtime import (
    Runtime,
    announce_stop,
    attach_monitor,
    check_vae_scale,
    forward_model,
)
from ldmkit.training.start import resolve_device, run_source, start_run
from ldmkit.training.state import (
    LoopState,
    restore_state,
    rewind_findings,
    save_state,
)
from ldmkit.training.step import global_vitals, train_step
from ldmkit.vitals import metrics as vm
from ldmkit.vitals.diagnose import Finding, coverage, scenario
from ldmkit.vitals.forecast import abnormal_step
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


def train(cfg: Config, run_dir: Path | None = None, resume: bool = False,
          stop_at: int | None = None, param: Parameterization | None = None,
          callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Train stage 2 (and stage 1 unless reused), or continue ``run_dir`` from its last checkpoint.

    ``resume`` (or a ``run_dir`` that already holds this config's run) continues it. ``stop_at``
    ends after that many total steps with a checkpoint (a time-sliced job). ``param`` is the
    training loss's parameterization instead of the config's: an extension point for an
    objective the config cannot name (the diagnosis tests plant their faults through a
    subclass); validation and sampling keep the config's, which the checkpoint records.
    ``callbacks`` see every step after ldmkit's own (training/callbacks.py), and are obeyed as
    they are: a benchmark's recorder, a user's own stop rule. Under torchrun every rank calls
    this.
    """
    d = init_distributed(cfg.device)
    try:
        return _train(cfg, run_dir, resume, stop_at, param, d, callbacks)
    finally:
        shutdown(d)


def _train(cfg: Config, run_dir: Path | None, resume: bool, stop_at: int | None,
           param: Parameterization | None, d: Dist, callbacks: Sequence[Callback]
           ) -> TrainResult:
    started, data = time.time(), LazyData.of(cfg)
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
        return _diffusion(opened, ae, latents, scale, rt, stop_at, param, started, callbacks)


def _start_state(opened: OpenedRun, cfg: Config, ae: Autoencoder, latents: LatentPosteriors,
                 n_train: int, calibrated: bool, rt: Runtime, source: ConditionSource
                 ) -> LoopState:
    """A fresh loop state, or the checkpoint's; logs rewound to it and the monitor attached."""
    tc, run_dir, scale = cfg.train, opened.run_dir, cfg.diffusion.latent_scale_factor
    spec = run_backbone(cfg, ae)
    # stage 2 draws from its own seed, not from where stage 1 (trained, or reused after a
    # kill) left torch's generator: a resume that skips stage 1 builds the same network
    torch.manual_seed(cfg.seed * 1_000_003 + 9)
    model = build_backbone(spec)
    source.attach(model)
    model = model.to(rt.device)
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
    state = LoopState(model, EMA(model, tc.ema_decay), build_optimizer(model, tc),
                      torch.Generator().manual_seed(cfg.seed + 4),
                      BatchOrder(n_train, tc.batch_size, cfg.seed + 5),
                      StepAccumulator(), spec)
    if opened.ckpt is not None:
        restore_state(opened.ckpt, state)
        if "train.lr" in opened.changes:  # a fix's or --set's rate is the one in effect now
            state.lr_scale = 1.0
        if rt.d.is_main:
            print(f"resumed from {opened.ckpt} at step {state.step}")
    if not rt.d.is_main:
        return state
    if opened.continuing:  # only now that the checkpoint loaded: forget redone steps
        rt.logger.rewind(state.step if opened.ckpt else -1)
        rewind_findings(run_dir, state.step if opened.ckpt else -1)
        RunDir(run_dir).rewind_changes(state.step if opened.ckpt else -1)
    write_text_atomic(RunDir(run_dir).config, to_yaml(cfg))
    record(RunDir(run_dir).fastpath, "train", state.step, rt.fast, tqdm.write)
    rt.monitor = attach_monitor(cfg, run_dir, rt.logger, scale, state.step)
    if state.step == 0:
        reach = vm.data_latent_extreme(latents.mean, latents.logvar,
                                       torch.Generator().manual_seed(cfg.seed + 6))
        rt.logger.log(0, {vm.SCALE_FACTOR: scale, vm.DATA_EXTREME: reach})
        if calibrated and rt.monitor is not None:
            check_vae_scale(ae, scale, rt.monitor)
        conditional = bool(cfg.model.num_classes or cfg.model.text_encoder)
        warning = guidance_finding(cfg, conditional, cfg.sample.guidance_scale, 0)
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


def _callbacks(cfg: Config, rt: Runtime, model: torch.nn.Module, param: Parameterization,
               validation: Validation, outputs: StepOutputs, logged: dict[str, float]
               ) -> list[Callback]:
    """The callbacks after the guard, in order: the forecast feeds the log record its risk;
    the stop check comes after this step's validation and samples; the checkpoint last."""
    forecast = Forecast(cfg, rt, model, param)
    log = IntervalLog(cfg, rt, model, param, forecast.take_logged,
                      lambda vitals: (logged.clear(), logged.update(vitals)))
    first = [forecast] if cfg.vitals.enabled and cfg.vitals.forecast else []
    return [*first, log, validation, Outputs(outputs), StopCheck(cfg, rt), Checkpoints(cfg)]


def _diffusion(opened: OpenedRun, ae: Autoencoder, latents: LatentPosteriors, scale: float,
               rt: Runtime, stop_at: int | None, step_param: Parameterization | None,
               started: float, extra: Sequence[Callback] = ()) -> TrainResult:
    """Stage 2: the loop (each step judged by the guard, then handed to the callbacks, whose
    decision it carries out), then the final samples."""
    d, run_dir = rt.d, opened.run_dir
    calibrated = opened.cfg.diffusion.latent_scale_factor is None
    cfg = dataclasses.replace(opened.cfg, diffusion=dataclasses.replace(
        opened.cfg.diffusion, latent_scale_factor=scale))
    tc, ctx = cfg.train, context_of(cfg, scale)
    parts = held_out.run_split(cfg, run_dir, latents, d.is_main)
    source = run_source(cfg, run_dir, latents, parts.train, d)
    state = _start_state(opened, cfg, ae, latents, len(parts.train), calibrated, rt, source)
    state.forecaster.threshold = ctx.thr("divergence_risk")
    state.forecaster.steps = int(ctx.thr("divergence_risk_steps"))
    state.forecaster.limit = ctx.thr("grad_norm_high")
    vset = held_out.prepare(cfg, run_dir, parts, latents, ae) if d.is_main else None
    # decoding up to 16k training images takes seconds (17 s for MNIST): at the first sampling
    reference = functools.cache(functools.partial(
        vm.CopyReference.of, ae.decode, latents.mean, parts.train, cfg.seed))
    evaluator = InLoopEval.of(cfg.data, parts.train, d, tqdm.write,
                              bool(cfg.model.text_encoder)) if tc.eval_every else None
    model = state.model
    ddp, compiled = _network(model, rt, run_dir, state)
    net, params = forward_model(compiled, rt), list(model.parameters())
    scratch = [torch.empty_like(p) for p in params]  # the weights before a measured update
    ratio_every = vm.update_ratio_every(tc.log_every)
    param, first_step = parameterization(cfg), state.step
    step_param = step_param or param
    end = min(tc.steps, stop_at) if stop_at else tc.steps
    grid, stopped_by, halted = None, None, False
    bar = tqdm(total=tc.steps, initial=state.step, desc="diffusion", dynamic_ncols=True,
               mininterval=1.0, disable=not d.is_main)
    model.train()
    validation = Validation(cfg, rt, vset, param, scale, source)
    if state.step == 0:  # the untrained model's: where each noise level starts from
        validation.measure(state)
    outputs = StepOutputs(cfg, ae, scale, rt, run_dir, reference, evaluator, source)
    state.pending = outputs.make(state, state.pending)  # what a stop cut short, made now
    guard = DivergenceGuard(cfg, run_dir, rt, model, latents.describe)
    logged: dict[str, float] = {}  # the last interval's train vitals
    callbacks = [*_callbacks(cfg, rt, model, param, validation, outputs, logged), *extra]
    while state.step < end:
        lr = lr_at(state.step, tc) * state.lr_scale
        set_lr(state.opt, lr)
        b = draw_batch(state, parts.train, latents, scale, cfg, d, rt.device, source)
        measure = scratch if state.step % ratio_every == 0 else None
        applied, step_vitals = compiled.run(train_step, net, params, state.opt, step_param,
                                            b.z, b.t, b.eps, tc.grad_clip, measure,
                                            tc.grad_accum_steps, ddp.no_sync if ddp else None,
                                            b.cond)
        step_vitals = global_vitals(step_vitals, b.z, d)
        event = StepEvent(state.step + 1, applied, abnormal_step(
            applied, float(step_vitals[vm.GRAD_NORM]), ctx.thr("grad_norm_high")),
            step_vitals, lr, b, end)
        decision = guard.on_step(event, state)
        if decision.action == "continue":
            if applied:
                state.ema.update(model)
            state.acc.add(step_vitals)
            state.step += 1
            bar.update(1)
            decision, save = dispatch(callbacks, event, state)
        else:
            save = False
        if decision.action == "remedy":
            apply_remedy(decision, cfg, run_dir, state, rt)
            if decision.remedy and decision.remedy.restart == "healthy":  # steps were undone
                bar.reset(total=tc.steps)
                bar.update(state.step)
        if save and d.is_main:
            save_state(run_dir, cfg, state)
        if decision.action in ("stop", "abort"):
            stopped_by = decision.finding
            if decision.action == "stop":
                announce_stop(run_dir, state.step, stopped_by, rt.stop, d,
                              repairing=rt.repairing(stopped_by))
                halted = True
            break
    bar.close()
    final_missing = not (RunDir(run_dir).samples(None) / "grid.png").is_file()
    vitals = logged
    if state.step >= tc.steps and not (stopped_by or halted) \
            and (state.step > first_step or final_missing):
        try:
            grid, sample_vitals = sample_and_log(cfg, state.step, state.ema, ae, scale, rt,
                                                 RunDir(run_dir).samples(None), cfg.sample.num,
                                                 True, reference, source)
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
