"""One step's draw: the batch's rows, latents, noise levels, noise and condition.

Every rank draws the whole global batch from the training generator (the same numbers on every
rank) and keeps its shard, so a run's draws do not depend on the number of processes; the
condition (diffusion/condition.py) travels with the batch, some of it dropped to the null class.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ldmkit.conditioning.sources import ConditionSource
from ldmkit.config import Config
from ldmkit.data.stage1 import LatentPosteriors
from ldmkit.diffusion.condition import Cond, dropped
from ldmkit.diffusion.schedule import sample_t
from ldmkit.platform.distributed import Dist, shard
from ldmkit.training.state import LoopState
from ldmkit.vitals import metrics as vm


@dataclass
class Batch:
    """One step's draw, this rank's shard, on the device."""

    index: torch.Tensor  # [B] dataset rows of the global batch
    z: torch.Tensor  # scaled latents
    t: torch.Tensor
    eps: torch.Tensor
    cond: Cond  # diffusion/condition.py: labels or captions, some dropped to the null one
    # what conditioning/cond_gap and optimization/attn_logit_max are measured on (host views,
    # moved only when measured): the global batch's first samples (z, t, eps) with their labels
    # before dropping ({} unconditional), the same for any number of processes
    probe: tuple[torch.Tensor, torch.Tensor, torch.Tensor, Cond]


def draw_batch(state: LoopState, train_rows: torch.Tensor, latents: LatentPosteriors,
               scale: float, cfg: Config, d: Dist, device: torch.device,
               source: ConditionSource) -> Batch:
    """The next batch; every rank draws the whole batch (the same numbers) and keeps its shard.
    Its condition is the ``source``'s rows; an unconditional model's draws are exactly those
    of a run before conditioning existed."""
    index = train_rows[state.order.next()]
    z = scale * latents.sample(index, state.gen)
    t = sample_t(len(index), cfg.diffusion.t_sampling, state.gen,
                 cfg.diffusion.logit_normal_loc, cfg.diffusion.logit_normal_scale)
    eps = torch.randn(z.shape, generator=state.gen)
    given = source.rows(index)
    cond = dropped(given, cfg.train.cond_drop_prob, state.gen, source.null)
    n = vm.COND_GAP_SAMPLES
    probe = (z[:n], t[:n], eps[:n], {k: v[:n] for k, v in given.items()})
    z, t, eps = (shard(x, d).to(device, non_blocking=True) for x in (z, t, eps))
    return Batch(index, z, t, eps, {k: shard(v, d).to(device) for k, v in cond.items()}, probe)
