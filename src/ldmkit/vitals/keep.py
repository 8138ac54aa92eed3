"""Which checkpoint to keep: the question fine-tuners ask most, answered from the vital signs
of a series of checkpoints (``ldmkit probe``'s log: one record of each sign per checkpoint).

Each checkpoint is judged by the rule table on the series up to it, so the answer uses the same
thresholds as every other finding. A checkpoint is spoiled from the first at which samples
copy training images (``memorization``), collapse onto one image per prompt or overall
(``prompt_collapse``, ``class_collapse``, ``mode_collapse``) or the held-out loss rises while
the training images' falls (``overfitting``): the maintainers' answer in the trainers' trackers
(OneTrainer #772, #859: "use a validation loss at fixed timesteps") made mechanical. Of the
checkpoints before that, the one with the lowest held-out loss is kept when there are held-out
images, else the latest (the training images' loss falls with training by design, so it cannot
choose).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ldmkit.vitals import tags as vm
from ldmkit.vitals.context import Context, Series
from ldmkit.vitals.diagnose import evaluate

SPOILERS = ("memorization", "memorization_rising", "prompt_collapse", "class_collapse",
            "mode_collapse", "overfitting")
LEARNED = 0.01  # a checkpoint whose training-image loss is not this share below the base's


@dataclass(frozen=True)
class Judged:
    step: int
    spoilers: tuple[str, ...]  # the codes that spoil it
    val_loss: float | None  # held-out loss (or the training images' without held-out images)
    train_loss: float | None  # the training images' loss at the same points


@dataclass(frozen=True)
class Choice:
    step: int | None  # None: no checkpoint is fit to keep (or there is none)
    reason: str
    judged: list[Judged]


def until(series: Series, step: int) -> Series:
    """The records at or before ``step``."""
    return {tag: [(s, v) for s, v in records if s <= step] for tag, records in series.items()}


def _at(series: Series, tag: str, step: int) -> float | None:
    value = next((v for s, v in series.get(tag, []) if s == step), None)
    return value if value is not None and math.isfinite(value) else None


def judge(series: Series, ctx: Context, steps: list[int]) -> list[Judged]:
    """Every step's spoiling findings, from the rules on the series up to it."""
    held_out = bool(series.get(vm.VAL_TRAIN_LOSS))
    judged = []
    for step in steps:
        codes = tuple(dict.fromkeys(f.code for f in evaluate(until(series, step), ctx)
                                    if f.code in SPOILERS and f.step == step))
        train = _at(series, vm.VAL_TRAIN_LOSS if held_out else vm.VAL_LOSS, step)
        judged.append(Judged(step, codes, _at(series, vm.VAL_LOSS, step), train))
    return judged


def choose(series: Series, ctx: Context, steps: list[int], names: dict[int, str] | None = None
           ) -> Choice:
    """The checkpoint to keep among ``steps`` (0: the base model, never chosen) and why."""
    names = names or {}
    label = lambda step: names.get(step, f"step {step}")  # noqa: E731
    judged = judge(series, ctx, sorted(steps))
    checkpoints = [j for j in judged if j.step != 0]
    if not checkpoints:
        return Choice(None, "only the base model was probed: pass checkpoints to choose among",
                      judged)
    spoiled = next((j for j in checkpoints if j.spoilers), None)
    fit = [j for j in checkpoints if spoiled is None or j.step < spoiled.step]
    why_spoiled = (f"{label(spoiled.step)}, which shows {' and '.join(spoiled.spoilers)}"
                   if spoiled else "")
    if not fit:
        return Choice(None, f"keep none: the first checkpoint, {why_spoiled}, is already "
                            "spoiled; train for fewer steps, on more images, or at a lower "
                            "learning rate", judged)
    held_out = bool(series.get(vm.VAL_TRAIN_LOSS))
    if held_out and all(j.val_loss is not None for j in fit):
        kept = min(fit, key=lambda j: j.val_loss)  # type: ignore[arg-type, return-value]
        reason = f"the lowest held-out loss ({kept.val_loss:.4g})"
    else:
        kept = fit[-1]
        reason = ("the latest" + (" (without held-out images (--holdout) only copies and "
                                  "collapse can tell an over-trained checkpoint)"))
    reason += (f" among the checkpoints before {why_spoiled}" if spoiled
               else "; no checkpoint copies, collapses or over-fits")
    base = next((j for j in judged if j.step == 0), None)
    if base and base.train_loss and kept.train_loss is not None \
            and abs(kept.train_loss / base.train_loss - 1) < LEARNED:
        reason += (f"; its loss on the training images ({kept.train_loss:.4g}) is within "
                   f"{LEARNED:.0%} of the base model's ({base.train_loss:.4g}): it may have "
                   "learned nothing (check the learning rate and that the LoRA is applied)")
    if base and held_out and base.val_loss is not None and kept.val_loss is not None \
            and kept.val_loss > base.val_loss:
        reason += (f"; its held-out loss is above the base model's ({base.val_loss:.4g}): "
                   "every checkpoint fits its training images at the expense of other images")
    return Choice(kept.step, f"keep {label(kept.step)}: {reason}", judged)
