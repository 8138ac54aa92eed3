"""What another trainer's saved config says about its run: the regime (pretraining or
fine-tuning), the objective, the loss weighting, and whether it computes in fp16.

Keys are the trainers' own (diffusers' and kohya's argparse names, OneTrainer's and
SimpleTuner's config files, ai-toolkit's and diffusion-pipe's nested keys flattened with dots).
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from ldmkit.diffusion.registry import OBJECTIVE_ALIASES
from ldmkit.vitals.logs.trainers import Regime, Trainer

# config keys that say the run starts from trained weights (diffusers, kohya and SimpleTuner
# name the base model pretrained_model_name_or_path; OneTrainer base_model_name)
FINETUNE_KEYS = ("pretrained_model_name_or_path", "base_model_name", "network_module",
                 "lora_rank", "instance_prompt")
FINETUNE_START = 0.5  # a first loss below this many guide units: never an untrained model's


def _present(value: Any) -> bool:
    return value not in (None, "", "None", "none", "null", False, "False")


def infer_regime(trainer: Trainer, config: dict[str, Any], losses: list[float],
                 window: int = 5) -> tuple[Regime, str]:
    """Pretraining or fine-tuning, and why: the run's config, the trainer, else the log (a loss
    that starts far below an untrained model's ~1 guide unit, ``losses`` in those units)."""
    for key in FINETUNE_KEYS:
        if _present(config.get(key)):
            return "finetune", f"its config sets {key} = {str(config[key])[:60]}"
    if trainer.regime is not None:
        what = "fine-tunes a trained model" if trainer.regime == "finetune" else "trains from scratch"
        return trainer.regime, f"{trainer.label} {what}"
    first = [v for v in losses[:window] if math.isfinite(v)]
    if first and statistics.median(first) < FINETUNE_START:
        return "finetune", (f"its loss starts at {statistics.median(first):.3g} guide units, "
                            "far below an untrained model's ~1")
    return "pretrain", "its loss starts near an untrained model's"


def objective_of(config: dict[str, Any]) -> str | None:
    """The objective a foreign run's config names (diffusers' and SimpleTuner's
    ``prediction_type``, kohya's ``v_parameterization``), or None."""
    kind = str(config.get("prediction_type") or "").lower()
    if kind in OBJECTIVE_ALIASES:
        return OBJECTIVE_ALIASES[kind]
    if str(config.get("v_parameterization", "")).lower() in ("true", "1"):
        return "v"
    return None


def min_snr_gamma_of(config: dict[str, Any]) -> float | None:
    """Min-SNR-gamma weighting (Hang et al. 2023) of a foreign run: diffusers' ``snr_gamma``,
    kohya's ``min_snr_gamma``; None when off."""
    for key in ("snr_gamma", "min_snr_gamma"):
        try:
            gamma = float(config.get(key))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            continue
        if math.isfinite(gamma) and gamma > 0:
            return gamma
    return None


# config keys that say a run computes in fp16: accelerate's (diffusers, kohya, musubi,
# SimpleTuner) mixed_precision, OneTrainer's train_dtype, ai-toolkit's train.dtype,
# diffusion-pipe's [model] dtype, ltx-trainer's acceleration.mixed_precision_mode
FP16_KEYS = ("mixed_precision", "train_dtype", "dtype", "train.dtype", "model.dtype",
             "acceleration.mixed_precision_mode")
FP16_VALUES = ("fp16", "float16", "float_16", "half", "torch.float16")


def setting(config: dict[str, Any], key: str) -> Any:
    """``config``'s value of a dotted ``key``, whether the config is flat (``a.b`` or ``a/b``,
    as MLflow and the TOML reader keep it) or nested (W&B's, YAML's); None when absent."""
    for flat in (key, key.replace(".", "/")):
        if flat in config:
            return config[flat]
    value: Any = config
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def fp16_setting(config: dict[str, Any]) -> str | None:
    """``KEY = VALUE`` of the setting that makes a foreign run compute in fp16, or None. fp16's
    range (max 65504) is the most reported cause of a NaN loss in these trainers (Flux and SD3.5
    in fp16; kohya-ss/sd-scripts #2137, #2313, #1571, #2104; kohya-ss/musubi-tuner #394)."""
    for key in FP16_KEYS:
        value = setting(config, key)
        if isinstance(value, str) and value.strip().lower() in FP16_VALUES:
            return f"{key} = {value.strip()}"
    return None
