"""The learning-rate schedule: a pure function of the step and ``train`` config.

So a resumed run and the diagnosis (``optimization/learning_rate`` must match what was
configured, guide: learning_rate) can both recompute it from the config alone, and the rules'
context reads it without importing the trainer.
"""

from __future__ import annotations

import math

from ldmkit.config.schema import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``cfg.lr`` over ``warmup_steps``, then cosine decay to ``min_lr_ratio * lr``.

    ``step`` counts optimizer updates already taken (0 for the first update).
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
