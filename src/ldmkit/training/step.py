"""One optimizer step of stage 2 and the vital signs it measures (vitals/signs.py).

The condition (diffusion/condition.py) travels with the batch through the micro-batches, the
parameterization and the backbone. Separate from the loop (training/loop.py) so that a benchmark or
another loop can run the same step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from ldmkit.diffusion import condition
from ldmkit.diffusion.condition import Cond
from ldmkit.diffusion.parameterization import Net, Parameterization
from ldmkit.platform.distributed import Dist, all_sum
from ldmkit.vitals import metrics as vm
from ldmkit.vitals.signs import StepTensors, rank_reduced, step_vitals

NoSync = Callable[[], contextlib.AbstractContextManager]


def accumulate(model: nn.Module | Net, param: Parameterization, z: torch.Tensor,
               t: torch.Tensor, eps: torch.Tensor, accum: int = 1, no_sync: NoSync | None = None,
               cond: Cond | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward of the batch in ``accum`` equal micro-batches, each loss divided by
    ``accum``: the gradient of the whole batch in 1/accum of the activation memory. Under DDP
    all but the last micro-batch skip the gradient all-reduce (``no_sync``). Returns the
    batch's loss and noise estimate ``[B, ...]``."""
    losses, preds = [], []
    parts = zip(z.chunk(accum), t.chunk(accum), eps.chunk(accum),
                condition.chunk(cond or {}, accum), strict=True)
    for i, (zc, tc, ec, cc) in enumerate(parts):
        skip_sync = no_sync is not None and i < accum - 1
        with no_sync() if skip_sync else contextlib.nullcontext():
            out = param.loss(model, zc, tc, ec, cc)
            (out.loss / accum).backward()
        losses.append(out.loss.detach())
        preds.append(out.eps_pred.detach())
    return torch.stack(losses).mean(), torch.cat(preds)


def train_step(model: nn.Module | Net, params: list[nn.Parameter],
               opt: torch.optim.Optimizer, param: Parameterization, z: torch.Tensor,
               t: torch.Tensor, eps: torch.Tensor, grad_clip: float,
               scratch: list[torch.Tensor] | None = None, accum: int = 1,
               no_sync: NoSync | None = None, cond: Cond | None = None
               ) -> tuple[bool, dict[str, torch.Tensor]]:
    """One update; returns whether it was applied and the step's vitals (device tensors).

    Under DDP ``backward`` all-reduces the gradients, so the norm (before clipping) is that of
    the synchronized gradient and every rank takes the same decision. With ``scratch`` (one
    buffer per parameter) the relative size of the applied update is measured too. ``accum``
    micro-batches (``accumulate``) give the same update and vitals: they describe the batch.
    """
    opt.zero_grad(set_to_none=True)
    loss, eps_pred = accumulate(model, param, z, t, eps, accum, no_sync, cond)
    grad_norm = nn.utils.clip_grad_norm_(params, grad_clip)
    finite = bool(torch.isfinite(loss) & torch.isfinite(grad_norm))
    weights = [p.detach() for p in params]
    if finite and scratch is not None:
        torch._foreach_copy_(scratch, weights)
    if finite:
        opt.step()
    vitals = step_vitals(StepTensors(loss, eps_pred, eps, t, z, grad_norm.detach(),
                                     loss_is_eps_mse=param.objective == "eps"))
    if finite and scratch is not None:  # a skipped step is no update: it has no ratio
        vitals[vm.UPDATE_RATIO] = vm.update_ratio(scratch, weights)
    return finite, vitals


def global_vitals(vitals: dict[str, torch.Tensor], z: torch.Tensor,
                  d: Dist) -> dict[str, torch.Tensor]:
    """Per-rank step vitals -> those of the global batch (one small all-reduce, no host sync;
    each sign's ``ranks`` in vitals/signs.py says how)."""
    if not d.active:
        return vitals
    return rank_reduced(vitals, {"z": z}, d.world, lambda x: all_sum(x, d) / d.world)


@torch.no_grad()
def cond_gap(net: Net, param: Parameterization, z: torch.Tensor, t: torch.Tensor,
             eps: torch.Tensor, cond: Cond, device: torch.device) -> float:
    """``conditioning/cond_gap`` of a few samples with their labels (before dropping), moved to
    ``device``: the conditional and unconditional noise estimates in one forward
    (vitals/metrics.py)."""
    z, t, eps = z.to(device), t.to(device), eps.to(device)
    cond = {key: value.to(device) for key, value in cond.items()}
    x = param.noised(z, t, eps)
    both = param.predict(net, torch.cat([x, x]), torch.cat([t, t]),
                         condition.joined(cond, condition.null(cond))).eps
    return vm.cond_gap(*both.chunk(2)).item()
