"""Where and how this process trains, and what it tells the user: the rank, device and logs,
the live monitor attached to the logs, and the stop requests and messages of the loop."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from ldmkit.config import Config, TrainConfig
from ldmkit.diffusion.parameterization import Net
from ldmkit.platform.distributed import Dist, any_rank
from ldmkit.platform.fastpath import EAGER_FP32, Compiled, FastPath
from ldmkit.platform.preemption import StopRequest
from ldmkit.run.context import context_of
from ldmkit.run.layout import RunDir
from ldmkit.vitals.diagnose import Finding, event_finding
from ldmkit.vitals.logs.metrics_jsonl import MetricLogger
from ldmkit.vitals.monitor import LiveMonitor


@dataclass
class Runtime:
    """Where and how this process trains: its rank, device, logs, live monitor, stop flag."""

    d: Dist
    device: torch.device
    logger: MetricLogger
    stop: StopRequest
    monitor: LiveMonitor | None = None
    fast: FastPath = EAGER_FP32  # the training step's precision and compilation (platform/fastpath.py)
    channels_last: bool = False

    @property
    def bf16(self) -> bool:
        return self.fast.bf16

    def repairing(self, finding: Finding | None) -> bool:
        """Whether the loop stops at ``finding`` for the job to repair it (``vitals.on_*:
        repair``), not to leave it to a person."""
        return bool(finding and self.monitor and self.monitor.mode_for(finding) == "repair")

    def stop_requested(self) -> bool:
        """Whether any rank was asked to stop (a collective under DDP): what sampling asks at
        each of its steps, so that a SIGTERM never waits for a whole sampling."""
        return any_rank(self.stop.requested, self.d, self.device)


def forward_model(model: nn.Module | Compiled, rt: Runtime) -> Net:
    """The backbone as the loss calls it: bf16 autocast and NHWC inputs when configured."""

    def forward(x: torch.Tensor, t: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        if rt.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with rt.fast.autocast():
            return model(x, t, **cond)

    return forward


def rng_untouched(device: torch.device) -> contextlib.AbstractContextManager:
    """A measuring forward (a probe, a re-run) inside this draws from a copy of torch's RNG, so
    dropout in it does not move the generator the next training steps draw from."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def attach_monitor(cfg: Config, run_dir: Path, logger: MetricLogger, scale: float,
                   step: int) -> LiveMonitor | None:
    """Live diagnosis on every value the logger writes from here on (guide rules, vitals/)."""
    if not cfg.vitals.enabled:
        return None
    ctx = context_of(cfg, scale, prompts=RunDir(run_dir).prompts())
    monitor = LiveMonitor(run_dir, ctx, cfg.vitals.on_critical, echo=tqdm.write,
                          on_warning=cfg.vitals.on_warning)
    if step > 0:
        monitor.prime(logger.series_until(step))
    monitor.text_sink = logger.log_text
    logger.observers.append(monitor)
    return monitor


def check_vae_scale(ae: nn.Module, scale: float, monitor: LiveMonitor) -> None:
    """A pretrained VAE's own ``scaling_factor`` (diffusers) against the calibrated scale."""
    own = getattr(ae, "scaling_factor", None)
    if own is None or abs(own / scale - 1) <= monitor.ctx.thr("vae_scale_rel_tol"):
        return
    monitor.record(event_finding("vae_scale_mismatch", 0, own, scale=scale,
                                 off=abs(own / scale - 1), z=own / scale), 0)


def should_stop(rt: Runtime, step: int, tc: TrainConfig, end: int) -> bool:
    """A stop request or a stopping finding, agreed by all ranks. Under DDP this costs a
    collective, so it is asked at log and checkpoint steps only."""
    local = rt.stop.requested or bool(rt.monitor and rt.monitor.stop_finding)
    if not rt.d.active:
        return local
    if step % tc.log_every and step % tc.checkpoint_every and step != end:
        return False
    return any_rank(local, rt.d, rt.device)



def announce_stop(run_dir: Path, step: int, finding: Finding | None, stop: StopRequest,
                   d: Dist, when: str = "", repairing: bool = False) -> None:
    if not d.is_main:
        return
    if finding is not None and repairing:
        tqdm.write(f"[vitals] stopping at step {step} to repair {finding.code} (vitals."
                   f"on_{finding.severity}=repair): {finding.fix}")
    elif finding is not None:
        tqdm.write(f"[vitals] stopping at step {step} (vitals.on_critical=stop): {finding.code}. "
                   f"Checkpoint saved; resume with `ldmkit train --resume {run_dir}` after the "
                   f"fix: {finding.fix}")
    elif when:
        tqdm.write(f"[ldmkit] {stop.signal_name or 'stop'} {when}: training is complete and "
                   f"saved at step {step}; `ldmkit sample {run_dir}` samples it, and `ldmkit train "
                   f"--resume {run_dir}` redoes the final samples")
    else:
        tqdm.write(f"[ldmkit] {stop.signal_name or 'stop'}: stopped after step {step} with a "
                   f"checkpoint; resume with `ldmkit train --resume {run_dir}` (or rerun the "
                   "same command)")
