"""Other trainers' validation losses in ldmkit's schema: one ``validation/loss`` and its
noise levels, whatever the trainer calls them.

Trainers that validate on several sets (OneTrainer's validation concepts, SimpleTuner's eval
datasets, diffusion-pipe's ``eval_datasets``) are mapped to ``validation/set/NAME/loss`` by the
tag table; the run's validation loss is then their pooled loss where the trainer logs one, else
the first set by name, and the read says which. diffusion-pipe's levels are quantiles of its
training timestep distribution (``train.py`` ``TIMESTEP_QUANTILES_FOR_EVAL``); they become t
through the run's own sampling settings, so the edges kept are the trainer's, not ldmkit's ten.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from statistics import NormalDist
from typing import Any

from ldmkit.vitals import tags as vm

SET_PREFIX = vm.VAL_PREFIX + "set/"
QUANTILE = "/loss_q"  # SET_PREFIX + NAME + QUANTILE + "0.10": a level as a quantile
POOLED = ("pooled", "total_average")  # the trainers' names for all sets together
QuantileToT = Callable[[float, dict[str, Any]], tuple[float, str]]
Record = tuple[int, str, float]


def diffusion_pipe_t(quantile: float, config: dict[str, Any]) -> tuple[float, str]:
    """The t of diffusion-pipe's eval quantile, and how it was found: ``models/*.py``
    ``prepare_inputs`` takes ``dist.icdf(quantile)`` of the training distribution
    (``timestep_sample_method``: logit_normal by default, scaled by ``sigmoid_scale``; uniform)
    then applies ``shift``; SDXL (``models/sdxl.py``) scales the quantile to its timesteps."""
    model = str(config.get("model.type", "")).lower()
    method = str(config.get("model.timestep_sample_method", "logit_normal")).lower()
    if model == "sdxl" or method == "uniform":
        t, how = quantile, "uniform timesteps"
    else:
        scale = _number(config.get("model.sigmoid_scale"), 1.0)
        t = 1 / (1 + math.exp(-scale * NormalDist().inv_cdf(quantile)))
        how = f"logit-normal timesteps (sigmoid_scale {scale:g})"
    shift = _number(config.get("model.shift"), 0.0)
    if shift > 0 and model != "sdxl":
        t = t * shift / (1 + (shift - 1) * t)
        how += f", shift {shift:g}"
    return t, how


def _number(value: Any, default: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return default
    return number if math.isfinite(number) else default


def training_side(records: list[Record]) -> list[Record]:
    """``metrics.LOSS_BETWEEN_VALIDATIONS``: at each validation step, the median of the finite
    training losses logged since the previous one (the moving average where no step's loss is
    logged). Empty when the run logged no validation."""
    validations = sorted({s for s, tag, _ in records if tag == vm.VAL_LOSS})
    logged = {tag for _, tag, _ in records}
    source = vm.LOSS if vm.LOSS in logged else vm.LOSS_SMOOTHED
    losses = sorted((s, v) for s, tag, v in records if tag == source and math.isfinite(v))
    derived, previous = [], -math.inf
    for step in validations:
        since = [v for s, v in losses if previous < s <= step]
        if since:
            derived.append((step, vm.LOSS_BETWEEN_VALIDATIONS, statistics.median(since)))
        previous = step
    return derived


def main_validation(records: list[Record], read_from: dict[str, list[str]],
                    config: dict[str, Any], to_t: QuantileToT | None) -> list[str]:
    """Adds ``validation/loss`` (and its levels) from the sets among ``records``, in place;
    returns what the read should say about it."""
    sets = sorted({tag[len(SET_PREFIX):-len("/loss")] for tag in read_from
                   if tag.startswith(SET_PREFIX) and tag.endswith("/loss")})
    if vm.VAL_LOSS in read_from or not sets:
        return []
    name = next((s for s in POOLED if s in sets), sets[0])
    chosen = f"{SET_PREFIX}{name}/loss"
    renamed = {chosen: vm.VAL_LOSS}
    how = ""
    for tag in list(read_from):
        if tag.startswith(f"{SET_PREFIX}{name}{QUANTILE}") and to_t is not None:
            try:
                quantile = float(tag.rsplit(QUANTILE, 1)[1])
            except ValueError:
                continue
            if 0 < quantile < 1:
                t, how = to_t(quantile, config)
                renamed[tag] = vm.level_tag(t)
    records += [(s, renamed[tag], v) for s, tag, v in records if tag in renamed]
    for tag, ours in renamed.items():
        read_from[ours] = read_from[tag]
    others = [s for s in sets if s != name]
    return [f"validation loss: set '{name}'" + (f" (also logged: {', '.join(others)[:200]})"
                                               if others else "")
            + (f"; its quantile levels as t by {how}" if how else "")]
