"""The training loop's state, and what a stage-2 checkpoint holds of it.

Resume is exact (bitwise on CPU): the model, EMA, optimizer, the training generator and torch's
global RNG, the data position, the partial log interval and the counters are restored, and the
logs are rewound to the checkpoint's step, so the steps that are run again are recorded once and
with the same values an uninterrupted run would have logged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ldmkit.config import Config, to_dict
from ldmkit.data.sources import BatchOrder
from ldmkit.errors import CheckpointError
from ldmkit.run.checkpoint import (
    load_checkpoint,
    optimizer_from_flat,
    optimizer_to_flat,
    save_checkpoint,
    split_prefix,
    with_prefix,
)
from ldmkit.run.layout import RunDir
from ldmkit.training.optim import EMA
from ldmkit.vitals.forecast import Forecaster
from ldmkit.vitals.logs.metrics_jsonl import rewind_jsonl
from ldmkit.vitals.signs import StepAccumulator


@dataclass
class LoopState:
    """Everything the training loop mutates; a checkpoint saves and restores all of it."""

    model: nn.Module
    ema: EMA
    opt: torch.optim.Optimizer
    gen: torch.Generator
    order: BatchOrder
    acc: StepAccumulator
    backbone: dict  # models/registry.py spec of ``model``
    step: int = 0
    nonfinite: int = 0
    rollbacks: int = 0
    repairs: int = 0  # remedies applied during training (vitals.on_*: repair)
    lr_scale: float = 1.0
    sick_since: int | None = None  # first step of the current run of abnormal steps (divergence)
    pending: list[str] = field(default_factory=list)  # outputs of ``step`` a stop cut short
    forecaster: Forecaster = field(default_factory=Forecaster)  # vitals/forecast.py's memory


SAMPLE, EVAL = "sample", "eval"  # the outputs a step may owe (training.loop.StepOutputs)


def save_state(run_dir: Path, cfg: Config, state: LoopState) -> Path:
    optim_tensors, optim_meta = optimizer_to_flat(state.opt)
    sums, count = state.acc.state()
    weights = {**with_prefix(state.model.state_dict(), "model."),
               **with_prefix(state.ema.model.state_dict(), "ema.")}
    training = {**optim_tensors, **with_prefix(sums, "acc."),
                "rng.train": state.gen.get_state(), "rng.torch": torch.get_rng_state()}
    meta = {"config": to_dict(cfg), "backbone": state.backbone,
            "latent_scale_factor": cfg.diffusion.latent_scale_factor, "optimizer": optim_meta,
            "data_order": state.order.state(),
            "ema_updates": state.ema.updates, "nonfinite_steps": state.nonfinite,
            "rollbacks": state.rollbacks, "lr_scale": state.lr_scale, "acc_count": count,
            "sick_since": state.sick_since, "pending": state.pending, "repairs": state.repairs,
            "forecast": state.forecaster.state()}
    return save_checkpoint(RunDir(run_dir).checkpoints, state.step, weights, training, meta,
                           cfg.train.checkpoint_keep)


def restore_state(path: Path, state: LoopState) -> None:
    weights, training, meta = load_checkpoint(path)
    try:
        state.model.load_state_dict(split_prefix(weights, "model."))
        state.ema.model.load_state_dict(split_prefix(weights, "ema."))
        optimizer_from_flat(state.opt, training, meta["optimizer"])
        state.gen.set_state(training["rng.train"])
        torch.set_rng_state(training["rng.torch"])
        state.order.load(meta["data_order"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise CheckpointError(f"checkpoint '{path}' does not match this config's model "
                              f"({str(exc).splitlines()[0]}); resume with the run's own config") from None
    state.ema.updates = meta["ema_updates"]
    state.acc.load(split_prefix(training, "acc."), meta.get("acc_count", 0))
    state.step, state.nonfinite = meta["step"], meta["nonfinite_steps"]
    state.rollbacks, state.lr_scale = meta.get("rollbacks", 0), meta.get("lr_scale", 1.0)
    state.sick_since, state.repairs = meta.get("sick_since"), meta.get("repairs", 0)
    if "forecast" in meta:
        state.forecaster.load(meta["forecast"])
    state.pending = [kind for kind in meta.get("pending", []) if kind in (SAMPLE, EVAL)]


def rewind_findings(run_dir: Path, step: int) -> None:
    rewind_jsonl(RunDir(run_dir).findings, step, "diffusion", step_key="at_step")


