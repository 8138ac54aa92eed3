"""``ldmkit probe BASE --data DIR [CHECKPOINT ...]``: a probe directory for a series.

Everything is checked before anything is written: the options' ranges, the pipeline, the
checkpoints (each put on the base and taken off again, ``apply.check``), the images and their
captions, and an existing ``--out`` (a new or empty folder, or a probe of the same base, data
and settings). The probe directory then holds what a run's directory holds for the readers:
``metrics.jsonl`` indexed by the checkpoints' steps (0: the base), ``prompts.json``,
``samples/step_N/grid.png`` (a column per prompt, a row per seed), and ``probe.json`` (what was
probed, each checkpoint measured, which to keep), so ``diagnose``, ``report`` and ``watch``
read it unchanged. A rerun measures only the checkpoints that are new or changed since
(``metrics.jsonl`` is rewound to the last unchanged one): point it at a trainer's output folder
again as checkpoints appear.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from tqdm import tqdm

from ldmkit.config import DataConfig
from ldmkit.data.captions import read_captions
from ldmkit.data.sources import list_folder, load_folder_data
from ldmkit.errors import CheckpointError, ConfigError
from ldmkit.platform.files import (
    check_plain_tree,
    check_replaceable,
    read_regular,
    write_bytes_atomic,
    write_text_atomic,
)
from ldmkit.platform.images import image_grid, save_png
from ldmkit.probe import measure
from ldmkit.probe.apply import applied, check
from ldmkit.probe.checkpoints import Checkpoint, find_series
from ldmkit.probe.pipelines import DEFAULT_GUIDANCE, Family, dtype_of, load_base, pipeline_index
from ldmkit.report.keep import keep_choice
from ldmkit.run.layout import PROBE_KIND, RunDir, claim
from ldmkit.vitals.keep import Choice
from ldmkit.vitals.logs.metrics_jsonl import MetricLogger

VERSION = 1
MAX_IMAGES = 1024  # images of a folder the probe encodes (a fixed sample beyond)
# the settings that make two probes comparable: a rerun must repeat them
IDENTITY = ("base", "data", "holdout", "points", "prompts", "seeds", "steps", "guidance",
            "resolution", "seed")


@dataclass(frozen=True)
class ProbeOptions:
    points: int = 200  # fixed (image, level, noise) points per image set
    prompts: int = 4  # training captions sampled
    seeds: int = 4  # samples per prompt
    steps: int = 20  # sampling steps of the pipeline's own sampler
    guidance: float | None = None  # None: the family's usual scale
    resolution: int | None = None  # None: the pipeline's default
    batch: int = 8
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0
    caption_extension: str = ".txt"

    def check(self) -> None:
        ranges = {"points": (10, 1_000_000), "prompts": (1, 1000), "seeds": (2, 1000),
                  "steps": (1, 1000), "batch": (1, 4096), "seed": (0, 2**31 - 1)}
        for name, (lo, hi) in ranges.items():
            value = getattr(self, name)
            if not lo <= value <= hi:
                raise ConfigError(f"--{name} {value} is out of range [{lo}, {hi}]")
        if self.guidance is not None and not (math.isfinite(self.guidance) and self.guidance >= 0):
            raise ConfigError(f"--guidance {self.guidance} must be a number >= 0")
        if self.resolution is not None and not (16 <= self.resolution <= 4096
                                                and self.resolution % 16 == 0):
            raise ConfigError(f"--resolution {self.resolution} must be a multiple of 16 in "
                              "[16, 4096]")
        if self.dtype not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"--dtype {self.dtype[:20]!r}: use auto, fp32, bf16 or fp16")
        if not (self.caption_extension.startswith(".") and len(self.caption_extension) > 1):
            raise ConfigError(f"--caption-extension {self.caption_extension[:20]!r} must start "
                              "with a dot, e.g. .txt")


@dataclass(frozen=True)
class ProbeResult:
    out: Path
    choice: Choice
    measured: int  # checkpoints measured by this call (the base counts)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name[:20]!r}: use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device here; use --device cpu")
    return device


def _data_config(folder: Path, options: ProbeOptions, size: int = 64) -> DataConfig:
    return DataConfig(source="folder", path=str(folder), image_size=size, channels=3,
                      caption_extension=options.caption_extension)


def _check_captions(folder: Path, options: ProbeOptions) -> None:
    """The folder's images are listed and every one has a caption (cheap: no image read)."""
    listing = list_folder(folder)
    if not listing.files:
        raise CheckpointError(f"'{folder}' holds no PNG/JPEG/WebP image; pass the training "
                              "images the checkpoints were trained on")
    read_captions(folder, listing.files, _data_config(folder, options))


def _images(family: Family, folder: Path, options: ProbeOptions, size: int) -> measure.Images:
    data = load_folder_data(_data_config(folder, options, size), captions=True)
    rows = torch.arange(len(data.images))
    if len(rows) > MAX_IMAGES:
        pick = torch.randperm(len(rows), generator=torch.Generator().manual_seed(options.seed))
        rows = pick[:MAX_IMAGES].sort().values
    captions = [data.captions[i] for i in rows.tolist()] if data.captions else [""] * len(rows)
    return measure.encode_images(family, data.images[rows], captions, options.batch)


def _prompts(captions: list[str], count: int, seed: int) -> list[str]:
    """``count`` distinct training captions, a fixed choice of the seed."""
    distinct = sorted(set(captions))
    pick = torch.randperm(len(distinct), generator=torch.Generator().manual_seed(seed + 5))
    return [distinct[i] for i in pick[:count].tolist()]


def _previous(out: Path, what: dict[str, Any], pset: measure.ProbeSet) -> list[dict]:
    """What an earlier probe into ``out`` measured, when it probed the same (else an error)."""
    settings = RunDir(out).probe_settings()
    if settings is None:
        return []
    old = settings.get("what", {})
    changed = [key for key in IDENTITY if old.get(key) != what[key]]
    if changed:
        key = changed[0]
        raise CheckpointError(f"'{out}' holds a probe of another {key} ({old.get(key)!r}, now "
                              f"{what[key]!r}); choose a new --out")
    try:
        stored = measure.ProbeSet(**load_safetensors(read_regular(RunDir(out).probe_draws)))
    except (OSError, ValueError, TypeError, RuntimeError):
        stored = None
    if stored is None or not stored.matches(pset):
        raise CheckpointError(f"'{RunDir(out).probe_draws}' is not the probe's draws (damaged or "
                              "edited); choose a new --out")
    measured = settings.get("measured")
    return measured if isinstance(measured, list) else []


def _entry(checkpoint: Checkpoint | None, base: Path) -> dict[str, Any]:
    if checkpoint is None:
        return {"step": 0, "name": "base", "path": str(base.resolve()), "kind": "base",
                "stamp": None}
    return {"step": checkpoint.step, "name": checkpoint.name,
            "path": str(checkpoint.path.resolve()),
            "kind": checkpoint.kind, "counts": checkpoint.counts, "stamp": checkpoint.stamp()}


def _unchanged(previous: list[dict], entries: list[dict]) -> int:
    """How many of ``entries`` an earlier probe measured as they are now (a common prefix)."""
    same = 0
    for old, new in zip(previous, entries, strict=False):
        if old != new:
            break
        same += 1
    return same


def cost(family: Family, options: ProbeOptions, prompts: int, guidance: float, held_out: bool
         ) -> tuple[int, int]:
    """Network evaluations per checkpoint: (validation, sampling) for ``prompts`` prompts
    (fewer than ``--prompts`` when the captions are fewer)."""
    return (options.points * (2 if held_out else 1),
            prompts * options.seeds * options.steps * family.passes(guidance))


def _save(out: Path, settings: dict[str, Any]) -> None:
    write_text_atomic(RunDir(out).probe_file, json.dumps(settings, indent=1) + "\n")


def _measure(family: Family, train: measure.Images, held: measure.Images | None,
             pset: measure.ProbeSet, prompts: list[str], options: ProbeOptions, guidance: float,
             reference: Any, bar: tqdm) -> tuple[dict[str, float], torch.Tensor]:
    per_sample = options.steps * family.passes(guidance)
    values = measure.validation_vitals(family, train, held, pset, options.batch, guidance,
                                       bar.update)
    samples, images = measure.sample_vitals(family, prompts, pset, options.steps, guidance,
                                            options.batch, reference,
                                            lambda n: bar.update(n * per_sample))
    return values | samples, images


def probe(base: Path, data: Path, checkpoints: list[Path], holdout: Path | None = None,
          out: Path | None = None, options: ProbeOptions | None = None) -> ProbeResult:
    """Measure the base and each checkpoint of the series; returns where, and which to keep."""
    options = options or ProbeOptions()
    options.check()
    pipeline_index(base)
    series = find_series(checkpoints)
    out = out or Path(f"probe_{(checkpoints[0] if checkpoints else base).resolve().name}")
    check_replaceable(out, PROBE_KIND)  # new, empty, or an earlier probe to extend
    if out.is_dir():
        check_plain_tree(out)
    for folder in (data, holdout):
        if folder is not None:
            _check_captions(folder, options)
    device = _device(options.device)
    family = load_base(base, device, dtype_of(options.dtype, device))
    resolution = options.resolution or family.default_resolution()
    family.at_resolution(resolution)
    guidance = DEFAULT_GUIDANCE[family.name] if options.guidance is None else options.guidance
    check(family, series)
    train = _images(family, data, options, resolution)
    held = _images(family, holdout, options, resolution) if holdout else None
    prompts = _prompts(train.captions, options.prompts, options.seed)
    pset = measure.draw(options.points, len(prompts), options.seeds,
                        tuple(train.latents.shape[1:]), options.seed)
    what = {"base": str(base.resolve()), "data": str(data.resolve()),
            "holdout": str(holdout.resolve()) if holdout else None, "points": options.points,
            "prompts": len(prompts), "seeds": options.seeds, "steps": options.steps,
            "guidance": guidance, "resolution": resolution, "seed": options.seed}
    previous = _previous(out, what, pset)
    entries = [_entry(None, base)] + [_entry(c, base) for c in series]
    done = _unchanged(previous, entries)
    scale, shift = family.vae_factors()
    settings = {"version": VERSION, "what": what, "pipeline": type(family.pipe).__name__,
                "objective": family.path.objective, "shift": family.path.shift,
                "latent_scale_factor": scale, "shift_factor": shift, "measured": entries[:done]}
    claim(out, PROBE_KIND)
    write_bytes_atomic(RunDir(out).probe_draws, save_safetensors(pset.tensors()))
    write_text_atomic(RunDir(out).prompts_file, json.dumps(prompts, indent=1))
    _save(out, settings)
    validation, sampling = cost(family, options, len(prompts), guidance, held is not None)
    todo = list(zip(entries, [None, *series], strict=True))[done:]
    print(f"probe: {type(family.pipe).__name__} ({family.path.objective}, {resolution}px) on "
          f"{len(train.latents)} training images"
          + (f" and {len(held.latents)} held out" if held else "")
          + f"; {len(todo)} of {len(entries)} to measure (the base and {len(series)} "
          f"checkpoints); per checkpoint {validation} validation + {sampling} sampling = "
          f"{validation + sampling} network evaluations ({options.points} points, "
          f"{len(prompts)} prompts x {options.seeds} seeds x {options.steps} steps)")
    reference = measure.copy_reference(family, train, options.batch) if todo else None
    data_vitals = measure.latent_vitals(family, train)  # the VAE's: no checkpoint changes it
    with MetricLogger(out) as logger:
        logger.rewind(entries[done - 1]["step"] if done else -1)
        for entry, checkpoint in todo:
            with tqdm(total=validation + sampling, unit="eval", desc=entry["name"][:30],
                      leave=False) as bar, applied(family, checkpoint):
                values, images = _measure(family, train, held, pset, prompts, options,
                                          guidance, reference, bar)
            logger.log(entry["step"], data_vitals | values)
            grid = RunDir(out).samples(entry["step"]) / "grid.png"
            grid.parent.mkdir(parents=True, exist_ok=True)
            save_png(image_grid(images, columns=len(prompts)), grid)
            settings["measured"].append(entry)
            _save(out, settings)
    choice = keep_choice(out)
    settings["keep"] = {"step": choice.step, "reason": choice.reason}
    _save(out, settings)
    return ProbeResult(out, choice, len(todo))

