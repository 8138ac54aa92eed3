"""The loop's per-step event and the callbacks that act on it (Lightning's callbacks).

Each step the loop hands a ``StepEvent`` (the step's vitals, whether it was applied and
abnormal, its learning rate and batch) to its callbacks in order, and obeys what they return:
go on, save a checkpoint, apply a remedy (config changes from a point to restart from, as
``vitals/remedy.py`` describes them), or stop. Logging, validation, sampling and eval, the stop
check and checkpointing are callbacks here; the divergence guard (training/divergence.py) judges
a step before it counts, the forecast (training/forecasting.py) after. Under DDP every rank
runs the same callbacks on the same global vitals, so all take the same decisions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ldmkit.conditioning.sources import ConditionSource
from ldmkit.config import Config
from ldmkit.diffusion.parameterization import Parameterization
from ldmkit.run.layout import RunDir
from ldmkit.training import held_out
from ldmkit.training.batch import Batch
from ldmkit.training.outputs import StepOutputs
from ldmkit.training.runtime import Runtime, forward_model, should_stop
from ldmkit.training.state import LoopState
from ldmkit.training.step import cond_gap
from ldmkit.vitals import metrics as vm
from ldmkit.vitals.diagnose import Finding
from ldmkit.vitals.remedy import Remedy

# by priority: the most severe decision of a step's callbacks is the one the loop carries out;
# "abort" stops with no checkpoint (the weights are not healthy: the guard's), "stop" saves one
Action = Literal["continue", "checkpoint", "remedy", "stop", "abort"]
PRIORITY: dict[str, int] = {"continue": 0, "checkpoint": 1, "remedy": 2, "stop": 3, "abort": 4}


@dataclass(frozen=True)
class Decision:
    action: Action = "continue"
    finding: Finding | None = None  # why
    remedy: Remedy | None = None  # "remedy": the changes, and where training restarts from
    checkpoint: Path | None = None  # the checkpoint of a restart from a healthy step
    by: str = ""  # who decided, for RUN/changes.jsonl


CONTINUE = Decision()


@dataclass(frozen=True)
class StepEvent:
    """One optimizer step as the callbacks see it."""

    step: int  # 1-based: the step this update was
    applied: bool  # finite loss and gradient: the update reached the weights
    abnormal: bool  # vitals.forecast.abnormal_step: not applied, or an exploding gradient
    vitals: dict[str, torch.Tensor]  # the global batch's (training/step.py)
    lr: float
    batch: Batch
    end: int  # the last step of this call (train.steps, or stop_at)


class Callback:
    """Acts on each step that counted (``state.step`` is ``event.step``)."""

    def on_step(self, event: StepEvent, state: LoopState) -> Decision:
        return CONTINUE


def dispatch(callbacks: Sequence[Callback], event: StepEvent, state: LoopState
             ) -> tuple[Decision, bool]:
    """Every callback sees the step in order; the most severe decision wins (the first of
    equals), so a stop still lets validation and sampling of that step happen first. Also
    returns whether one asked for a checkpoint (saved after a remedy is applied, so that a
    resume from it goes on with the remedy)."""
    chosen, save = CONTINUE, False
    for callback in callbacks:
        decision = callback.on_step(event, state)
        save = save or decision.action in ("checkpoint", "stop")
        if PRIORITY[decision.action] > PRIORITY[chosen.action]:
            chosen = decision
    return chosen, save


@dataclass
class IntervalLog(Callback):
    """Every ``train.log_every`` steps (and at the end), the interval's train vitals: means of
    each step's exact tensors (vitals/signs.py), the learning rate, the non-finite steps, and,
    measured on the batch's first samples, the label gap and the largest attention logit."""

    cfg: Config
    rt: Runtime
    model: torch.nn.Module
    param: Parameterization
    extras: Callable[[StepEvent, LoopState], dict[str, float]] = lambda event, state: {}
    on_logged: Callable[[dict[str, float]], None] | None = None

    def on_step(self, event: StepEvent, state: LoopState) -> Decision:
        step, rt = event.step, self.rt
        if step % self.cfg.train.log_every and step != event.end:
            return CONTINUE
        vitals = {**state.acc.read(), vm.LEARNING_RATE: event.lr,
                  vm.NONFINITE_STEPS: state.nonfinite, **self.extras(event, state)}
        if event.batch.probe[3] and rt.d.is_main:  # conditional; rank 0 alone logs it
            vitals[vm.COND_GAP] = cond_gap(forward_model(self.model, rt), self.param,
                                           *event.batch.probe, rt.device)
        if state.lr_scale != 1.0 or state.rollbacks or state.repairs:
            vitals[vm.LR_SCALE] = state.lr_scale
        rt.logger.log(step, vitals)
        if self.on_logged is not None:
            self.on_logged(vitals)
        return CONTINUE


@dataclass
class Validation(Callback):
    """The deterministic validation loss of the raw and EMA weights (rank 0), every
    ``train.val_every`` steps and at the last step."""

    cfg: Config
    rt: Runtime
    vset: held_out.ValidationSet | None
    param: Parameterization
    scale: float
    source: ConditionSource

    def measure(self, state: LoopState) -> None:
        if self.vset is not None:
            self.rt.logger.log(state.step, held_out.measure(
                state.model, state.ema.model, lambda net: forward_model(net, self.rt),
                self.param, self.vset, self.scale, self.source))

    def on_step(self, event: StepEvent, state: LoopState) -> Decision:
        every = self.cfg.train.val_every
        if every and (event.step % every == 0 or event.step == self.cfg.train.steps):
            self.measure(state)
        return CONTINUE


@dataclass
class Outputs(Callback):
    """Samples and ``eval/*`` when due (training/outputs.py); what a stop cut short is owed."""

    outputs: StepOutputs

    def on_step(self, event: StepEvent, state: LoopState) -> Decision:
        state.pending = self.outputs.make(state, self.outputs.due(event.step))
        return CONTINUE


@dataclass
class StopCheck(Callback):
    """A stop request (SIGTERM, SIGINT) or a finding that stops training (``vitals.on_*``)."""

    cfg: Config
    rt: Runtime

    def on_step(self, event: StepEvent, state: LoopState) -> Decision:
        if not should_stop(self.rt, event.step, self.cfg.train, event.end):
            return CONTINUE
        return Decision("stop", self.rt.monitor.stop_finding if self.rt.monitor else None)


@dataclass
class Checkpoints(Callback):
    """A checkpoint every ``train.checkpoint_every`` steps and at the last step."""

    cfg: Config

    def on_step(self, event: StepEvent, state: LoopState) -> Decision:
        if event.step % self.cfg.train.checkpoint_every == 0 or event.step == event.end:
            return Decision("checkpoint")
        return CONTINUE


def record_change(run_dir: Path, decision: Decision, step: int) -> None:
    """A remedy applied during training, as a line of ``RUN/changes.jsonl``."""
    remedy, finding = decision.remedy, decision.finding
    if remedy is None or finding is None:
        return
    RunDir(run_dir).log_change({"fix": [finding.code], "by": decision.by,
                                "changes": dict(remedy.changes), "restart": remedy.restart,
                                "at_step": step, "live": True})
