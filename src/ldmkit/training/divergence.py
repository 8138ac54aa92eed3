"""What a run does about a step that is not finite: never apply it, and go back to healthy weights.

A non-finite loss is the end of a divergence that began earlier: a learning rate too high
blows the weights up over a few steps before the loss overflows (guide: loss "NaN or inf:
training has collapsed, likely due to a learning rate that is too high"; grad_norm "> 100:
exploding gradients"). So the weights to go back to are not the newest checkpoint's but those
saved before the divergence began. ``LoopState.sick_since`` is the first step of the current run
of abnormal steps (a non-finite loss or gradient, or a pre-clipping gradient norm above the
``grad_norm_high`` threshold). The weights saved at step c produced step c + 1's gradient,
so checkpoint c is known healthy when c + 1 < sick_since, or when it is the run's start.
Newer checkpoints move to ``checkpoints/diverged/``: kept for inspection, never resumed from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from ldmkit.config import Config
from ldmkit.platform.distributed import barrier
from ldmkit.run.checkpoint import step_of
from ldmkit.run.layout import ROLLBACK, RunDir
from ldmkit.training.callbacks import CONTINUE, Decision, StepEvent, record_change
from ldmkit.training.runtime import Runtime, forward_model, rng_untouched
from ldmkit.training.state import LoopState, restore_state, rewind_findings
from ldmkit.vitals import metrics as vm
from ldmkit.vitals.diagnose import Finding, event_finding, retry_lr
from ldmkit.vitals.remedy import Remedy


@dataclass(frozen=True)
class Origin:
    """Where a non-finite step first went wrong: ``batch`` (the data), ``forward`` (the first
    module whose output is not finite from finite inputs), ``backward`` (a finite loss with a
    non-finite gradient), or ``unknown``; ``name`` says which indices, module or parameter."""

    where: str
    name: str
    bf16: bool


def locate_nonfinite(model: nn.Module, forward: Callable, z: torch.Tensor, t: torch.Tensor,
                     index: torch.Tensor, bf16: bool,
                     describe: Callable[[list[int]], str] = lambda rows: f"dataset indices {rows}",
                     cond: dict[str, torch.Tensor] | None = None) -> Origin:
    """Find the origin of a non-finite step: its batch is checked, then its forward pass is run
    again with a hook on every module (in execution order), then the gradients the step left
    on the parameters are read. Costs one forward, and only on a non-finite step."""
    bad = ~torch.isfinite(z.detach().flatten(1)).all(1).cpu()
    if bad.any():
        rows = index[: len(bad)][bad][:8].tolist()
        return Origin("batch", describe(rows), bf16)
    found: list[str] = []

    def hook(name: str) -> Callable:
        def check(module: nn.Module, inputs: tuple, output: object) -> None:
            outs = output if isinstance(output, tuple) else (output,)
            if found or all(torch.isfinite(o).all() for o in outs if torch.is_tensor(o)):
                return
            if all(torch.isfinite(i).all() for i in inputs if torch.is_tensor(i)):
                found.append(name)
        return check

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad(), rng_untouched(z.device):
            forward(z, t, **(cond or {}))
    finally:
        for handle in handles:
            handle.remove()
    if found:
        return Origin("forward", found[0], bf16)
    grads = [n for n, p in model.named_parameters()
             if p.grad is not None and not torch.isfinite(p.grad).all()]
    if grads:  # backward runs from the output: the last in module order went first
        return Origin("backward", f"{grads[-1]} (and {len(grads) - 1} more)", bf16)
    return Origin("unknown", "the loss", bf16)


def origin_finding(origin: Origin, step: int, value: float, lr: float) -> Finding:
    """The event that names a non-finite step's origin, with the fix that matches it."""
    return event_finding(f"nonfinite_{origin.where}", step, value, name=origin.name,
                         precision="bf16 autocast" if origin.bf16 else "fp32",
                         lr=retry_lr(lr))


def healthy_bound(sick_since: int) -> int:
    """The newest step whose saved weights are known to predate the divergence."""
    return max(sick_since - 2, 0)


@dataclass
class DivergenceGuard:
    """Judges each step before it counts (training/callbacks.py): tracks the run of abnormal
    steps (``vitals.forecast.abnormal_step``, the rule ``grad_norm_exploding``'s definition
    too), names where a non-finite step went wrong, and decides what ``vitals.on_nonfinite``
    asks: skip it (the step counts, unapplied), roll back (a remedy: the learning rate
    x ``rollback_lr_factor`` from the newest healthy checkpoint), or stop."""

    cfg: Config
    run_dir: Path
    rt: Runtime
    model: nn.Module
    describe: Callable[[list[int]], str]
    previous_applied: bool = True

    def on_step(self, event: StepEvent, state: LoopState) -> Decision:
        first_bad = not event.applied and self.previous_applied
        self.previous_applied = event.applied
        state.sick_since = (state.sick_since or event.step) if event.abnormal else None
        if event.applied:
            return CONTINUE
        state.nonfinite += 1
        rt, b = self.rt, event.batch
        if first_bad and rt.d.is_main:  # the first of a run of non-finite steps: where from?
            origin = locate_nonfinite(self.model, forward_model(self.model, rt), b.z, b.t,
                                      b.index, rt.bf16, self.describe, b.cond)
            announce(rt, origin_finding(origin, event.step, float(event.vitals[vm.LOSS]),
                                        event.lr), event.step - 1)
        if self.cfg.vitals.on_nonfinite == "skip":
            return CONTINUE
        return self._roll_back_or_stop(event, state)

    def _roll_back_or_stop(self, event: StepEvent, state: LoopState) -> Decision:
        """Both go back to the last healthy checkpoint. Rollback is a remedy the loop applies:
        restore it, rewind the logs to it, scale the learning rate. Stop (or rollbacks
        exhausted) logs the interval that diverged, so the report and ``diagnose`` show it,
        and leaves the healthy checkpoint as the one ``--resume`` continues from. The event is
        recorded at the healthy checkpoint's step, so a later rewind keeps it."""
        cfg, rt, vc = self.cfg, self.rt, self.cfg.vitals
        began = state.sick_since or event.step
        value = float(event.vitals[vm.LOSS])
        if rt.d.is_main:
            RunDir(self.run_dir).quarantine_after(healthy_bound(began))
        barrier(rt.d)
        ckpt = RunDir(self.run_dir).checkpoint_at_most(healthy_bound(began))
        effective = cfg.train.lr * state.lr_scale
        common = {"began": began, "to": step_of(ckpt), "n": state.rollbacks,
                  "max": vc.max_rollbacks, "lr_scale": state.lr_scale, "lr": retry_lr(effective),
                  "run": str(self.run_dir)}
        if vc.on_nonfinite == "stop" or state.rollbacks >= vc.max_rollbacks or ckpt is None:
            code = "nonfinite_stop" if vc.on_nonfinite == "stop" or ckpt is None \
                else "rollback_exhausted"
            state.acc.add(event.vitals)
            rt.logger.log(event.step, {**state.acc.read(), vm.LEARNING_RATE: event.lr,
                                       vm.NONFINITE_STEPS: state.nonfinite})
            finding = event_finding(code, event.step, value, **common)
            announce(rt, finding, step_of(ckpt))
            return Decision("abort", finding)
        lr_scale = state.lr_scale * vc.rollback_lr_factor
        finding = event_finding("nonfinite_rollback", event.step, value,
                                **{**common, "n": state.rollbacks + 1, "lr_scale": lr_scale,
                                   "lr": cfg.train.lr * lr_scale})
        remedy = Remedy((("train.lr", cfg.train.lr * lr_scale),), "healthy", True, finding.fix)
        return Decision("remedy", finding, remedy, ckpt, ROLLBACK)


def apply_remedy(decision: Decision, cfg: Config, run_dir: Path, state: LoopState,
                 rt: Runtime) -> None:
    """Carry out a remedy decided during training: go back to the healthy checkpoint it names
    (weights, optimizer, data position; the logs and findings rewound to it) or go on from the
    current weights, change the learning rate, count it, and record it in ``changes.jsonl``
    and ``findings.jsonl``. The counts and the scale survive the restore."""
    remedy, finding = decision.remedy, decision.finding
    assert remedy is not None and finding is not None
    counts = state.rollbacks, state.repairs
    if remedy.restart == "healthy" and decision.checkpoint is not None:
        restore_state(decision.checkpoint, state)
        if rt.d.is_main:
            rt.logger.rewind(state.step)
            rewind_findings(run_dir, state.step)
        if rt.monitor is not None:
            rt.monitor.prime(rt.logger.series_until(state.step))
    state.rollbacks, state.repairs = counts
    for key, value in remedy.changes:
        if key == "train.lr":
            state.lr_scale = float(value) / cfg.train.lr
    if decision.by == ROLLBACK:
        state.rollbacks += 1
    else:
        state.repairs += 1
    if rt.d.is_main:
        record_change(run_dir, decision, state.step)
    announce(rt, finding, state.step)


def announce(rt: Runtime, finding: Finding, at_step: int) -> None:
    """Print and record a finding the trainer raised itself."""
    if rt.monitor is not None:
        rt.monitor.record(finding, at_step)
    elif rt.d.is_main:
        tqdm.write(f"[vitals] {finding.severity.upper()} {finding.code}: {finding.message}")
