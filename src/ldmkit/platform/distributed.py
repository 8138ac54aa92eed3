"""Multi-process training on PyTorch's own engine: torchrun + DistributedDataParallel.

``torchrun --nproc_per_node N -m ldmkit train CONFIG`` sets ``RANK``/``WORLD_SIZE``; this module
joins the process group (``nccl`` on GPU, ``gloo`` on CPU) and provides the few collectives the
trainer needs so that vital signs are global, not rank 0's: means of per-rank values (equal
shards), sums for pooled statistics, and gathering of samples. A single process needs none of
it: every helper is the identity when ``world == 1``.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ldmkit.errors import ConfigError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


SINGLE = Dist()


def init_distributed(device: str) -> Dist:
    """Join torchrun's process group if launched by it; otherwise a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    if dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo",
                            timeout=datetime.timedelta(minutes=30))
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank)


def shutdown(d: Dist) -> None:
    if d.active and dist.is_initialized():
        dist.destroy_process_group()


def shard_size(total: int, d: Dist, what: str) -> int:
    if total % d.world:
        raise ConfigError(f"{what} = {total} must be divisible by the {d.world} processes; "
                          f"use a multiple of {d.world}")
    return total // d.world


def shard(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """Rank ``r``'s contiguous slice of a global batch ``[B, ...]`` (B divisible by world)."""
    if not d.active:
        return x
    n = x.shape[0] // d.world
    return x[d.rank * n:(d.rank + 1) * n]


def all_sum(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.active:
        y = x.to(_collective_device(), copy=True)
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        return y.to(x.device)
    return x


def all_gather_cat(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """Concatenate every rank's ``[n, ...]`` (same n) in rank order."""
    if not d.active:
        return x
    parts = [torch.empty_like(x) for _ in range(d.world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def any_rank(flag: bool, d: Dist, device: torch.device) -> bool:
    """True on every rank when it is true on one (a stop request, a critical finding)."""
    if not d.active:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()


def _collective_device() -> torch.device:
    return torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")


def broadcast_float(value: float, d: Dist) -> float:
    """Rank 0's value on every rank (e.g. the calibrated latent scale)."""
    if not d.active:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.broadcast(t, src=0)
    return float(t.item())


def broadcast_text(text: str, d: Dist) -> str:
    """Rank 0's string on every rank (e.g. the run directory it chose)."""
    if not d.active:
        return text
    box = [text]
    dist.broadcast_object_list(box, src=0)
    return str(box[0])
