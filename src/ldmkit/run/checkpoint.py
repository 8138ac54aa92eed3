"""Checkpoints as safetensors + JSON: loading never unpickles, so never executes code.

Layout of ``run_dir/checkpoints/step_0001000/``:
  ``weights.safetensors``  model.* and ema.* tensors
  ``training.safetensors`` optimizer state tensors and RNG states
  ``meta.json``            step, config, latent scale, optimizer hyper-parameters, data position
A checkpoint is written to a temporary directory, fsynced and renamed into place, so a crash or
a full disk mid-save never leaves a half-written checkpoint under a real name, and the previous
one stays loadable.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from ldmkit.errors import CheckpointError
from ldmkit.platform.files import load_tensors, read_json, remove_owned, write_dir_atomically

FORMAT_VERSION = 1
CHECKPOINT = "checkpoint"
STEP_DIR = re.compile(r"step_\d{1,12}")


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True))


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into tensors and JSON-able hyper-parameters."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{key}"] = value.contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                        meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    for name, value in meta["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(ckpt_root: Path, step: int, weights: dict[str, torch.Tensor],
                    training: dict[str, torch.Tensor], meta: dict, keep: int) -> Path:
    """Write ``step_XXXXXXX`` atomically and delete all but the newest ``keep``."""
    final = ckpt_root / step_dir_name(step)

    def write(tmp: Path) -> None:
        save_file({k: v.detach().contiguous() for k, v in weights.items()},
                  str(tmp / "weights.safetensors"))
        save_file({k: v.detach().contiguous() for k, v in training.items()},
                  str(tmp / "training.safetensors"))
        _write_json(tmp / "meta.json", {"format_version": FORMAT_VERSION, "step": step, **meta})

    write_dir_atomically(final, write, CHECKPOINT)
    for old in list_checkpoints(ckpt_root)[:-keep]:
        remove_owned(old, CHECKPOINT)
    return final


def step_dir_name(step: int) -> str:
    """``step_0001000``: a checkpoint's directory, and that of the samples of the same step."""
    return f"step_{step:07d}"


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.glob("step_*") if STEP_DIR.fullmatch(p.name)
             and not p.is_symlink() and (p / "meta.json").is_file()]
    return sorted(found, key=step_of)


def step_of(ckpt: Path | None) -> int:
    """The step a checkpoint directory (``step_0001000``) was saved at; 0 for none."""
    return int(ckpt.name.split("_")[1]) if ckpt is not None else 0


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """(weights, training tensors, meta) of one checkpoint directory."""
    try:
        meta = read_json(path / "meta.json")
        weights = load_tensors(path / "weights.safetensors")
        training = (load_tensors(path / "training.safetensors")
                    if (path / "training.safetensors").exists() else {})
    except (OSError, ValueError, SafetensorError) as exc:
        raise CheckpointError(f"checkpoint '{path}' is unreadable ({str(exc)[:200]}); resume "
                              "from an older one by moving this directory away") from None
    problem = meta_problem(meta)
    if problem:
        raise CheckpointError(f"checkpoint '{path}' has a damaged meta.json ({problem}); resume "
                              "from an older one by moving this directory away")
    return weights, training, meta


def _is_int(value: Any, lo: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= lo


def _is_positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value) and value > 0


# meta.json field -> check; the fields every reader of a checkpoint relies on
_META_CHECKS: dict[str, Callable[[Any], bool]] = {
    "step": _is_int,
    "config": lambda v: isinstance(v, dict),
    "latent_scale_factor": _is_positive,
    "optimizer": lambda v: isinstance(v, dict) and isinstance(v.get("param_groups"), list)
    and isinstance(v.get("scalars"), dict),
    "data_order": lambda v: isinstance(v, dict) and _is_int(v.get("epoch"))
    and _is_int(v.get("cursor")),
    "ema_updates": _is_int,
    "nonfinite_steps": _is_int,
}
# fields added later: checked when present
_OPTIONAL_CHECKS: dict[str, Callable[[Any], bool]] = {
    "acc_count": _is_int,
    "rollbacks": _is_int,
    "lr_scale": _is_positive,
    "sick_since": lambda v: v is None or _is_int(v, 1),
    "pending": lambda v: isinstance(v, list) and all(k in ("sample", "eval") for k in v),
}


def meta_problem(meta: Any) -> str | None:
    """What is wrong with a checkpoint's ``meta.json`` (None when nothing is)."""
    if not isinstance(meta, dict):
        return "not a JSON object"
    for key, ok in (*_META_CHECKS.items(), *_OPTIONAL_CHECKS.items()):
        if key not in meta:
            if key in _META_CHECKS:
                return f"no '{key}'"
        elif not ok(meta[key]):
            return f"'{key}' is {str(meta[key])[:40]!r}"
    return None


def split_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """``{"model.conv.weight": w}`` -> ``{"conv.weight": w}`` for prefix "model."."""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def with_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state.items()}
