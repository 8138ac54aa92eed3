"""Putting one checkpoint onto the base pipeline, and taking it off again.

The base is loaded once. A LoRA goes on through the pipeline's own ``load_lora_weights``
(diffusers converts kohya's, ai-toolkit's, OneTrainer's and peft's key layouts) and comes off
with ``unload_lora_weights``, which restores the base weights exactly. A full fine-tune's
denoiser weights replace the base's (``load_state_dict``, strict: every name and shape). Only
one checkpoint is ever in memory besides the base.

``check`` applies and removes every checkpoint of a series before the probe writes anything: a
damaged LoRA, a LoRA for another base (no key it holds names a module of this one, or a shape
that differs) or a full checkpoint of another architecture is a one-line error at the start,
not after an hour of measurements.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from ldmkit.errors import CheckpointError
from ldmkit.probe.checkpoints import Checkpoint, tensor_names
from ldmkit.probe.pipelines import Family, quiet_diffusers

ADAPTER = "probe"
# what trainers put before a denoiser's own names in a full checkpoint of it alone
PREFIXES = ("unet.", "transformer.", "model.", "module.")
LOAD_ERRORS = (ValueError, RuntimeError, KeyError, TypeError, IndexError, AttributeError,
               SafetensorError, OSError)


def _strip(names: list[str], own: set[str]) -> str:
    """The prefix to remove from ``names`` so they are the denoiser's own ('' for none)."""
    for prefix in ("", *PREFIXES):
        if sum(n.startswith(prefix) and n[len(prefix):] in own for n in names) > len(names) // 2:
            return prefix
    return ""


def _full_state(family: Family, checkpoint: Checkpoint, load: bool) -> dict[str, torch.Tensor]:
    """The checkpoint's denoiser weights under the denoiser's names (only their shapes are
    checked when not ``load``); one-line errors for another architecture."""
    own = family.denoiser.state_dict()
    with safe_open(str(checkpoint.weights), framework="pt") as handle:
        names = list(handle.keys())
        prefix = _strip(names, set(own))
        shapes = {n[len(prefix):]: tuple(handle.get_slice(n).get_shape()) for n in names
                  if n.startswith(prefix)}
    missing = sorted(set(own) - set(shapes))
    wrong = sorted(n for n in set(own) & set(shapes) if tuple(own[n].shape) != shapes[n])
    if missing or wrong:
        what = (f"{len(missing)} of the base's {len(own)} weights are missing (first: "
                f"{missing[0]})" if missing else f"'{wrong[0]}' has shape {shapes[wrong[0]]}, "
                f"the base's {tuple(own[wrong[0]].shape)}")
        raise CheckpointError(f"checkpoint '{checkpoint.path}' is not a "
                              f"{type(family.denoiser).__name__} of this base ({what}); probe it "
                              "with its own base, or convert it to diffusers' layout")
    if not load:
        return {}
    state = load_file(str(checkpoint.weights))
    return {name[len(prefix):]: value for name, value in state.items()
            if name.startswith(prefix) and name[len(prefix):] in own}


def _lora_on(family: Family, checkpoint: Checkpoint) -> None:
    pipe = family.pipe
    try:
        # diffusers' notes on the parts a LoRA leaves alone, peft's on names it did not
        # place: the count of adapted layers below says what matters, in one line
        with quiet_diffusers(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=RuntimeWarning, module="peft")
            pipe.load_lora_weights(str(checkpoint.weights), adapter_name=ADAPTER)
    except LOAD_ERRORS as exc:
        with contextlib.suppress(*LOAD_ERRORS):
            pipe.unload_lora_weights()
        detail = " ".join(str(exc).split())[:160]
        raise CheckpointError(f"LoRA '{checkpoint.path}' does not load onto this base "
                              f"({type(exc).__name__}: {detail}); is it a LoRA of this base "
                              "model?") from None
    loaded = _adapted_modules(pipe)
    if loaded == 0:
        raise CheckpointError(f"LoRA '{checkpoint.path}' holds no weight for any module of this "
                              f"{type(pipe).__name__}: it was trained for another base model; "
                              "probe it with its own base")
    held = _lora_modules(checkpoint)
    if loaded < held:
        pipe.unload_lora_weights()
        raise CheckpointError(f"only {loaded} of the {held} layers LoRA '{checkpoint.path}' "
                              "adapts load onto this base (diffusers maps the rest of its names "
                              "to no module): its figures would not be the LoRA's; re-save it in "
                              "one layout (peft's lora_A/lora_B, or kohya's)")


# the first matrix of each adapted layer, in the layouts load_lora_weights reads
_DOWN = re.compile(r"(?:lora_A|lora_down|lora\.down)(?:\.[\w-]+)?\.weight$")


def _lora_modules(checkpoint: Checkpoint) -> int:
    """How many layers the LoRA file adapts (0 for a LoKr, LoHa or other form not counted)."""
    return sum(1 for name in tensor_names(checkpoint.weights) if _DOWN.search(name))


def _adapted_modules(pipe: Any) -> int:
    """Layers of the pipeline's networks that carry the probe's adapter."""
    count = 0
    for name in ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3"):
        network = getattr(pipe, name, None)
        if isinstance(network, torch.nn.Module):
            count += sum(1 for m in network.modules()
                         if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict)
                         and ADAPTER in m.lora_A)
    return count


@contextlib.contextmanager
def applied(family: Family, checkpoint: Checkpoint | None) -> Iterator[None]:
    """The base with ``checkpoint`` on it (None: the base alone) for the ``with`` block."""
    if checkpoint is None:
        yield
        return
    if checkpoint.kind == "full":
        state = _full_state(family, checkpoint, load=True)
        family.denoiser.load_state_dict({k: v.to(family.denoiser.dtype) for k, v in state.items()},
                                        strict=True)
        del state
        yield
        return
    _lora_on(family, checkpoint)
    try:
        yield
    finally:
        family.pipe.unload_lora_weights()


def check(family: Family, series: list[Checkpoint]) -> None:
    """Every checkpoint of ``series`` goes onto this base (nothing is measured or written)."""
    for checkpoint in series:
        if checkpoint.kind == "full":
            _full_state(family, checkpoint, load=False)
            continue
        with applied(family, checkpoint):
            pass

