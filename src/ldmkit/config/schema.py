"""Experiment configuration: typed dataclasses, YAML loading, validation, dotted overrides.

One YAML file describes one experiment. Every key is checked against the dataclasses below,
so a typo (``trian.lr``) or a wrong type (``log_every: "often"``) fails at start with a message
naming the key, instead of silently training with a default. Key names the metrics guide uses
(``log_every``, ``grad_clip``, ``latent_scale_factor``) keep the guide's spelling.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ldmkit.config.typed import build, check, ranged
from ldmkit.config.untrusted import MAX_CONFIG_BYTES, brief, check_size
from ldmkit.diffusion.registry import OBJECTIVE_NAMES, OBJECTIVES, SAMPLERS
from ldmkit.errors import ConfigError
from ldmkit.platform.files import parse_yaml, read_file_text


@dataclass
class DataConfig:
    """Where images come from; see ``ldmkit.data.sources`` for the formats."""

    source: Literal["digits", "folder", "idx"] = "digits"
    path: str | None = None
    split: Literal["train", "test"] = "train"
    image_size: int = ranged(32, lo=4, hi=4096)
    channels: Literal[1, 3] = 1
    limit: int | None = ranged(None, lo=1)
    latent_cache: str = "auto"  # auto (RUN/latents), off, or a directory shared between runs
    # held out of stage 2 for the validation loss (an IDX test file is used instead when present)
    val_fraction: float = ranged(0.02, lo=0.0, hi=0.5)
    val_max: int = ranged(512, lo=1)
    # captions of a folder (text-conditional models, data/captions.py): a metadata.jsonl at its
    # root (Hugging Face ImageFolder: file_name and this column), else a file beside each image
    # with this extension (kohya sd-scripts, OneTrainer, ai-toolkit)
    caption_extension: str = ".txt"
    caption_column: str = "text"
    missing_caption: Literal["error", "empty"] = "error"  # empty: train it as the empty caption


@dataclass
class AutoencoderConfig:
    """Stage 1: a KL autoencoder (Rombach et al. 2022, sec. 3) with downsampling 2**(len(mult)-1)."""

    pretrained: str | None = None
    base_channels: int = ranged(32, lo=1, hi=4096)
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2],
                                    metadata=check(1, hi=64, min_len=1))
    latent_channels: int = ranged(4, lo=1, hi=256)
    kl_weight: float = ranged(1e-4, lo=0.0)
    steps: int = ranged(1500, lo=0)
    batch_size: int = ranged(64, lo=1)
    lr: float = ranged(1e-3, lo=0.0, strict=True)
    log_every: int = ranged(100, lo=1)
    calibration_batches: int = ranged(16, lo=1)


@dataclass
class UNetConfig:
    """Stage 2 backbone ``model.type: unet``: ADM-style UNet (Dhariwal & Nichol 2021)."""

    type: Literal["unet"] = "unet"
    base_channels: int = ranged(64, lo=1, hi=4096)
    channel_mult: list[int] = field(default_factory=lambda: [1, 2], metadata=check(1, hi=64, min_len=1))
    num_res_blocks: int = ranged(2, lo=1, hi=32)
    attention_resolutions: list[int] = field(default_factory=lambda: [4], metadata=check(1))
    num_heads: int = ranged(4, lo=1, hi=256)
    dropout: float = ranged(0.0, lo=0.0, hi=1.0)
    num_classes: int | None = ranged(None, lo=1, hi=1_000_000)  # null: unconditional
    # captions through cross-attention: builtin (a byte-level transformer trained jointly,
    # models/text.py), a local Hugging Face CLIP or T5 encoder directory (frozen, cached;
    # models/hf_text.py) or null; exclusive with num_classes
    text_encoder: str | None = None
    text_width: int = ranged(128, lo=8, hi=4096)  # the built-in encoder's
    text_depth: int = ranged(2, lo=1, hi=48)  # the built-in encoder's
    # tokens kept of each caption: UTF-8 bytes (builtin), the tokenizer's tokens (frozen)
    text_max_length: int = ranged(64, lo=1, hi=4096)

    def check(self, latent: int) -> None:
        """The latent halves at every level; every self-attention layer splits its channels into
        ``num_heads`` equal heads."""
        levels = 2 ** (len(self.channel_mult) - 1)
        if latent % levels:
            raise ConfigError(
                f"latent size {latent} must be divisible by {levels} (from model.channel_mult)"
            )
        size, widths = latent, []
        for i, mult in enumerate(self.channel_mult):
            if size in self.attention_resolutions:
                widths.append((self.base_channels * mult, f"at {size}x{size}"))
            size = size // 2 if i < len(self.channel_mult) - 1 else size
        widths.append((self.base_channels * self.channel_mult[-1], "in the middle block"))
        for width, where in widths:
            if width % self.num_heads:
                raise ConfigError(f"model.num_heads {self.num_heads} does not divide the {width} channels "
                                  f"of the attention {where} (model.base_channels x channel_mult); "
                                  "choose a num_heads that divides them")


@dataclass
class DiTConfig:
    """Stage 2 backbone ``model.type: dit``: Diffusion Transformer (Peebles & Xie 2023) with
    adaLN-Zero blocks; ``patch_size`` 2 on 8x8 latents gives 16 tokens."""

    type: Literal["dit"] = "dit"
    patch_size: int = ranged(2, lo=1, hi=64)
    hidden_size: int = ranged(256, lo=4, hi=8192)
    depth: int = ranged(6, lo=1, hi=128)
    num_heads: int = ranged(4, lo=1, hi=256)
    num_classes: int | None = ranged(None, lo=1, hi=1_000_000)  # null: unconditional
    # captions through cross-attention: builtin (a byte-level transformer trained jointly,
    # models/text.py), a local Hugging Face CLIP or T5 encoder directory (frozen, cached;
    # models/hf_text.py) or null; exclusive with num_classes
    text_encoder: str | None = None
    text_width: int = ranged(128, lo=8, hi=4096)  # the built-in encoder's
    text_depth: int = ranged(2, lo=1, hi=48)  # the built-in encoder's
    # tokens kept of each caption: UTF-8 bytes (builtin), the tokenizer's tokens (frozen)
    text_max_length: int = ranged(64, lo=1, hi=4096)

    def check(self, latent: int) -> None:
        if latent % self.patch_size:
            raise ConfigError(f"latent size {latent} must be divisible by model.patch_size "
                              f"{self.patch_size}; choose a patch size that divides it")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"model.num_heads {self.num_heads} does not divide model.hidden_size "
                              f"{self.hidden_size}; choose a num_heads that divides it")
        if self.hidden_size % 4:
            raise ConfigError(f"model.hidden_size {self.hidden_size} must be a multiple of 4 (the 2-D "
                              "sin-cos position embedding gives a quarter of it to each of sin and "
                              "cos of row and column)")


MODELS = {"unet": UNetConfig, "dit": DiTConfig}  # model.type -> its section (models/registry.py)


@dataclass
class DiffusionConfig:
    """The objective, its noise schedule and loss weighting (diffusion/parameterization.py).

    ``cosine``: continuous-time VP diffusion with a cosine log-SNR schedule, for the eps, v and
    x0 objectives; ``logsnr_min`` sets the noisiest level, where sampling starts from N(0, I);
    -5 is close to Stable Diffusion's terminal SNR (-5.4). Much lower values make eps-prediction
    samplers unstable. ``linear``: the rectified-flow path, for the ``flow`` objective.
    """

    objective: Literal[OBJECTIVE_NAMES] = "eps"  # diffusion/registry.py
    schedule: Literal["cosine", "linear"] = "cosine"
    loss_weighting: Literal["none", "min_snr"] = "none"
    min_snr_gamma: float = ranged(5.0, lo=0.0, strict=True)
    latent_scale_factor: float | None = ranged(None, lo=0.0, strict=True)
    t_sampling: Literal["uniform", "logit_normal"] = "uniform"
    logit_normal_loc: float = 0.0
    logit_normal_scale: float = ranged(1.0, lo=0.0, strict=True)
    logsnr_min: float = ranged(-5.0, lo=-30.0, hi=30.0)
    logsnr_max: float = ranged(10.0, lo=-30.0, hi=30.0)


@dataclass
class TrainConfig:
    """Optimisation of stage 2: AdamW, linear warmup then cosine decay, clipping, EMA."""

    steps: int = ranged(4000, lo=1)
    batch_size: int = ranged(128, lo=1)
    lr: float = ranged(1e-3, lo=0.0, strict=True)
    min_lr_ratio: float = ranged(0.05, lo=0.0, hi=1.0)
    warmup_steps: int = ranged(200, lo=0)
    weight_decay: float = ranged(0.0, lo=0.0)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    grad_clip: float = ranged(1.0, lo=0.0, strict=True)
    ema_decay: float = ranged(0.999, lo=0.0, hi=1.0)
    log_every: int = ranged(50, lo=1)
    sample_every: int = ranged(1000, lo=1)
    checkpoint_every: int = ranged(1000, lo=1)
    checkpoint_keep: int = ranged(3, lo=1)
    grad_accum_steps: int = ranged(1, lo=1, hi=4096)  # micro-batches per step (batch_size: the step's)
    val_every: int = ranged(250, lo=0)  # deterministic validation loss (0: off); ldmkit.training.held_out
    eval_every: int = ranged(0, lo=0)  # eval/* on 256 samples during training (0: off; labels)
    # bf16 autocast of the networks' forwards; auto: where the device has native bf16 (platform/fastpath.py)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool | Literal["auto"] = "auto"  # torch.compile; auto: where it pays (platform/fastpath.py)
    channels_last: bool = False  # NHWC memory format (measured slower on CPU: BENCHMARKS.md)
    # a class-conditional model trains the null class on this share of samples (CFG needs it)
    cond_drop_prob: float = ranged(0.1, lo=0.0, hi=1.0)




# One set of bounds per setting, wherever it is given (a config, --set, a command's flag):
MAX_SAMPLES = 50_000  # FID's customary count; samples are held in memory
MAX_SAMPLER_STEPS = 10_000  # ten times a DDPM's 1000 ancestral steps
MAX_GUIDANCE = 1000.0
MAX_SEED = 2**32 - 1  # numpy's seed range; seeds are combined (seed * 1_000_003 + epoch) below 2^63


@dataclass
class SampleConfig:
    """Sampling during training (fixed noise, so grids are comparable) and at the end."""

    num: int = ranged(64, lo=2, hi=MAX_SAMPLES)
    sampler: Literal[SAMPLERS] = "ddim"
    steps: int = ranged(50, lo=1, hi=MAX_SAMPLER_STEPS)
    eta: float = ranged(0.0, lo=0.0, hi=1.0)
    seed: int = ranged(0, lo=0, hi=MAX_SEED)
    during_training_num: int = ranged(16, lo=2, hi=MAX_SAMPLES)
    # classifier-free guidance (1: none); past MAX_GUIDANCE the samples are only overflow
    guidance_scale: float = ranged(1.0, lo=0.0, hi=MAX_GUIDANCE)
    guidance_interval: list[float] = field(default_factory=lambda: [0.0, 1.0],
                                           metadata=check(0.0, hi=1.0, min_len=2))
    # a text-conditional model's grid during training: these, then captions of the data, one
    # prompt per column (conditioning/sources.py)
    prompts: list[str] = field(default_factory=list)


@dataclass
class VitalsConfig:
    """Live diagnosis (ldmkit.vitals): the guide's thresholds can be overridden by name.

    ``on_nonfinite`` decides what a step with a NaN/Inf loss or gradient does (it is never
    applied): ``skip`` it, ``rollback`` to the last checkpoint with the learning rate times
    ``rollback_lr_factor`` (at most ``max_rollbacks`` times), or ``stop`` with a checkpoint.
    ``on_critical`` / ``on_warning: repair`` stop at a finding whose remedy is automatic
    (``vitals.remedy``) and apply it as ``ldmkit fix`` does, at most ``max_repairs`` times a run.
    ``forecast`` watches every step for a divergence ahead (``divergence_ahead``); under
    ``on_warning: repair`` its remedy is applied at once, from the current weights.
    """

    enabled: bool = True
    forecast: bool = True
    on_critical: Literal["warn", "stop", "repair"] = "warn"
    on_warning: Literal["warn", "repair"] = "warn"
    max_repairs: int = ranged(3, lo=0, hi=100)
    on_nonfinite: Literal["skip", "rollback", "stop"] = "skip"
    rollback_lr_factor: float = ranged(0.5, lo=0.0, strict=True, hi=1.0)
    max_rollbacks: int = ranged(3, lo=0)
    # inf is allowed: a threshold no value reaches turns its rule off
    thresholds: dict[str, float] = field(default_factory=dict, metadata={"any_float": True})


@dataclass
class Config:
    """A whole experiment. ``run_dir: null`` makes a new ``runs/<name>-<timestamp>`` directory."""

    name: str = "ldm"
    seed: int = ranged(0, lo=0, hi=MAX_SEED)
    run_dir: str | None = None
    device: str = "auto"
    tensorboard: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    model: UNetConfig | DiTConfig = field(default_factory=UNetConfig,
                                          metadata={"by_type": MODELS})
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    vitals: VitalsConfig = field(default_factory=VitalsConfig)


def _validate(cfg: Config) -> Config:
    """Cross-field checks that a single type cannot express."""
    if cfg.data.source in ("folder", "idx") and not cfg.data.path:
        raise ConfigError(f"data.source '{cfg.data.source}' needs data.path; set it to a directory")
    objective = OBJECTIVES[cfg.diffusion.objective]
    if cfg.diffusion.schedule not in objective.schedules:
        raise ConfigError(f"diffusion.objective '{objective.name}' does not go with "
                          f"diffusion.schedule '{cfg.diffusion.schedule}': {objective.name} "
                          f"needs diffusion.schedule {' or '.join(objective.schedules)}")
    if cfg.train.batch_size % cfg.train.grad_accum_steps:
        raise ConfigError(f"train.batch_size {cfg.train.batch_size} must be divisible by "
                          f"train.grad_accum_steps {cfg.train.grad_accum_steps}: each step's "
                          "batch is split into that many equal micro-batches")
    if cfg.diffusion.logsnr_min >= cfg.diffusion.logsnr_max:
        raise ConfigError("diffusion.logsnr_min must be below diffusion.logsnr_max")
    factor = 2 ** (len(cfg.autoencoder.channel_mult) - 1)
    if cfg.data.image_size % factor:
        raise ConfigError(
            f"data.image_size {cfg.data.image_size} must be divisible by the autoencoder's "
            f"downsampling factor {factor} (from autoencoder.channel_mult)"
        )
    latent = cfg.data.image_size // factor
    cfg.model.check(latent)
    if cfg.model.text_encoder and cfg.model.num_classes:
        raise ConfigError("model.num_classes and model.text_encoder are both set: a model is "
                          "conditioned on classes or on captions; set one of them to null")
    if cfg.model.text_encoder and cfg.data.source != "folder":
        raise ConfigError(f"model.text_encoder needs captions, which only a folder has "
                          f"(data.source is '{cfg.data.source}'); set data.source: folder")
    if cfg.model.text_encoder is not None and not cfg.model.text_encoder.strip():
        raise ConfigError("model.text_encoder is empty; set it to builtin, to a local Hugging "
                          "Face text encoder directory, or to null")
    if cfg.model.text_encoder and cfg.model.text_width % 4:
        raise ConfigError(f"model.text_width {cfg.model.text_width} must be a multiple of 4 "
                          "(the text encoder's 4 attention heads split it)")
    if not cfg.data.caption_extension.startswith(".") or "/" in cfg.data.caption_extension:
        raise ConfigError(f"data.caption_extension must look like .txt, got "
                          f"{brief(cfg.data.caption_extension)}")
    _check_device(cfg.device)
    if len(cfg.train.betas) != 2 or not all(0 <= b < 1 for b in cfg.train.betas):
        raise ConfigError(f"train.betas must be two numbers in [0, 1), got {cfg.train.betas}")
    interval = cfg.sample.guidance_interval
    if len(interval) != 2 or interval[0] > interval[1]:
        raise ConfigError(f"sample.guidance_interval must be [low, high] times with low <= high "
                          f"in [0, 1], got {interval}")
    return cfg


def _check_device(name: str) -> None:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (``mps`` on Apple); availability is checked
    when training starts, where the hardware is known."""
    kind, _, index = name.partition(":")
    if kind not in ("auto", "cpu", "cuda", "mps") or (index and not (kind == "cuda"
                                                                     and index.isdigit())):
        raise ConfigError(f"config key 'device' must be auto, cpu, cuda, cuda:N or mps, got "
                          f"{brief(name)}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=1e-4"`` -> (["train", "lr"], 1e-4); values are read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{brief(text)[1:-1]}' must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = parse_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{brief(text)[1:-1]}': value is not valid YAML "
                          f"({getattr(exc, 'problem', None) or exc})") from None
    check_size(value, f"override '{key.strip()[:60]}'")
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set dotted keys in a raw config mapping; unknown keys are caught later by validation."""
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{brief(text)[1:-1]}': '{brief(part)[1:-1]}' is "
                                  "not a section")
            node = child
        node[path[-1]] = value
    return data


def from_dict(data: dict) -> Config:
    """Validate a raw mapping and build a Config."""
    if not isinstance(data, dict):
        raise ConfigError("a config must be a YAML mapping of sections (data, train, ...)")
    check_size(data, "the config")
    return _validate(build(Config, _renamed(data)))


def _renamed(data: dict) -> dict:
    """``unet:`` is the old name of ``model:`` (runs saved before the backbone registry, and
    ``--set unet.*`` on them): its keys are the model's."""
    if "unet" not in data:
        return data
    unet, model = data["unet"], data.get("model", {"type": "unet"})
    for key, value in (("unet", unet), ("model", model)):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {brief(value)}")
    rest = {k: v for k, v in data.items() if k != "unet"}
    return {**rest, "model": {**model, **unet}}


# keys added after runs were saved without them: the value such a run had (not the new default)
SAVED_DEFAULTS = {("data", "val_fraction"): 0.0}


def load_config(path: str | Path | None, overrides: list[str] | None = None,
                saved: bool = False) -> Config:
    """Read a YAML experiment file (or only defaults if ``path`` is None), then apply overrides.

    ``saved``: the file is a run's own ``config.yaml``; keys it lacks take ``SAVED_DEFAULTS``.
    """
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' not found; pass a YAML file like configs/digits.yaml")
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file '{path}' is larger than {MAX_CONFIG_BYTES >> 20} MiB; "
                              "a config is a page of YAML: pass the right file")
        try:
            data = parse_yaml(read_file_text(path)) or {}
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            line = f" at line {where.line + 1}" if where else ""
            raise ConfigError(f"config file '{path}' is not valid YAML{line}: "
                              f"{getattr(exc, 'problem', None) or type(exc).__name__}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file '{path}' cannot be read ({exc}); pass a UTF-8 YAML "
                              "file") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of sections")
        check_size(data, f"config file '{path}'")
    if saved:
        for (section, key), value in SAVED_DEFAULTS.items():
            if isinstance(data.get(section, {}), dict):
                data.setdefault(section, {}).setdefault(key, value)
    return from_dict(apply_overrides(data, overrides or []))


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
