"""The checkpoints a probe measures: what each file or folder is, and the order of a series.

A checkpoint is a LoRA (any key layout ``load_lora_weights`` converts: peft/diffusers
``lora_A``/``lora_B``, kohya's and musubi's ``lora_unet_*.lora_down``, ai-toolkit's,
OneTrainer's), or a full fine-tune: the denoiser's weights in one ``.safetensors`` file (the
base gives its config) or in a pipeline or ``checkpoint-N`` folder (``unet/``,
``transformer/``). A folder of such checkpoints is a series. Only the headers of ``.safetensors``
files are read here (never a pickle); a damaged file is a one-line error naming it.

The series is ordered by the step or epoch number the trainers write into the names:

- kohya sd-scripts and musubi-tuner: ``NAME-000004`` (epoch) and ``NAME-step00001000``
  (``library/train_util.py``'s ``EPOCH_FILE_NAME``, ``STEP_FILE_NAME``); the final save is the
  bare ``NAME``, placed last;
- ai-toolkit: ``NAME_000001000`` (step, 9 digits; ``jobs/process/BaseSDTrainProcess.py``);
- diffusers' examples and SimpleTuner: ``checkpoint-500/`` folders;
- OneTrainer: ``...-save-STEP-EPOCH-EPOCHSTEP`` and ``backup/...-backup-STEP-EPOCH-EPOCHSTEP``
  (``modules/trainer/GenericTrainer.py``, ``TrainProgress.filename_string``);
- diffusion-pipe: ``step500/``, ``epoch5/`` folders;

else by the last number in the name, else by modification time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from safetensors import SafetensorError, safe_open

from ldmkit.errors import CheckpointError
from ldmkit.platform.files import is_hidden

Kind = Literal["lora", "full"]
DENOISER_DIRS = ("unet", "transformer")
LORA_MARKERS = ("lora_", "lora.", ".alpha", "lokr_", "loha_", "hada_", "dora_scale")
# (pattern on the stem, what its number counts); the first that matches names the step
NUMBERED = (
    (re.compile(r"-(?:save|backup)-(\d+)-\d+-\d+$"), "step"),  # OneTrainer
    (re.compile(r"(?:^|[-_])step[-_]?(\d+)$"), "step"),  # kohya --save_every_n_steps, d-pipe
    (re.compile(r"(?:^|[-_])checkpoint[-_](\d+)$"), "step"),  # diffusers, SimpleTuner
    (re.compile(r"_(\d{9})$"), "step"),  # ai-toolkit
    (re.compile(r"(?:^|[-_])epoch[-_]?(\d+)$"), "epoch"),  # diffusion-pipe, kohya variants
    (re.compile(r"-(\d{6})$"), "epoch"),  # kohya --save_every_n_epochs
    (re.compile(r"(\d+)(?!.*\d)"), "number"),  # any other: the last number in the name
)


@dataclass(frozen=True)
class Checkpoint:
    path: Path  # the file, or the folder holding the weights
    weights: Path  # the .safetensors file measured (a folder's denoiser or LoRA file)
    kind: Kind
    step: int  # where it sits on the probe's axis (0: the base)
    counts: str  # what ``step`` counts: step, epoch, number, final, order (by time)

    @property
    def name(self) -> str:
        return self.path.name

    def stamp(self) -> list[float]:
        """Size and time of its weights: a rerun re-measures a checkpoint that changed."""
        stat = self.weights.stat()
        return [stat.st_size, stat.st_mtime]


def tensor_names(path: Path) -> list[str]:
    """The tensor names in a ``.safetensors`` header; a one-line error when it is damaged."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError, ValueError) as exc:
        detail = " ".join(str(exc).split())[:120]
        raise CheckpointError(f"checkpoint '{path}' is not a readable .safetensors file "
                              f"({detail}); re-save it, or remove it from the series") from None


def kind_of(path: Path) -> Kind:
    names = tensor_names(path)
    if not names:
        raise CheckpointError(f"checkpoint '{path}' holds no tensor; re-save it, or remove it")
    return "lora" if any(m in name for name in names for m in LORA_MARKERS) else "full"


def _weights_in(folder: Path) -> tuple[Path, Kind] | None:
    """The weights a checkpoint folder holds: its denoiser's, else its one LoRA file."""
    for sub in DENOISER_DIRS:
        files = sorted((folder / sub).glob("*.safetensors")) if (folder / sub).is_dir() else []
        if len(files) == 1:
            return files[0], "full"
        if len(files) > 1:
            raise CheckpointError(f"'{folder / sub}' holds its weights in {len(files)} shards; "
                                  "ldmkit probes a denoiser saved as one .safetensors file")
    loras = [f for f in sorted(folder.glob("*.safetensors")) if kind_of(f) == "lora"]
    if len(loras) == 1:
        return loras[0], "lora"
    return None


def _entry(path: Path) -> tuple[Path, Kind] | None:
    if path.is_file() and path.suffix == ".safetensors":
        return path, kind_of(path)
    if path.is_dir():
        return _weights_in(path)
    return None


def _number(stem: str) -> tuple[int, str] | None:
    for pattern, counts in NUMBERED:
        match = pattern.search(stem)
        if match:
            return int(match.group(1)), counts
    return None


def order(found: list[tuple[Path, Path, Kind]]) -> list[Checkpoint]:
    """The series in training order with its steps: by the numbers in the names when every
    name but a final save (a bare name that the numbered ones extend) has one, else by time."""
    numbered = {path: _number(path.stem if path.is_file() else path.name)
                for path, _, _ in found}
    finals = [path for path, n in numbered.items() if n is None]
    stems = [p.stem for p, n in numbered.items() if n is not None]
    if finals and len(finals) == 1 and stems and all(s.startswith(finals[0].stem) for s in stems):
        top = max(n[0] for n in numbered.values() if n is not None)
        numbered[finals[0]] = (top + 1, "final")
    if all(n is not None for n in numbered.values()):
        series = [Checkpoint(path, weights, kind, *numbered[path])  # type: ignore[misc]
                  for path, weights, kind in found]
        series.sort(key=lambda c: (c.step, c.name))
        if min(c.step for c in series) == 0:  # a checkpoint named 0 keeps the base's step free
            series = [Checkpoint(c.path, c.weights, c.kind, c.step + 1, c.counts) for c in series]
    else:
        found = sorted(found, key=lambda item: (item[1].stat().st_mtime, item[0].name))
        series = [Checkpoint(path, weights, kind, i + 1, "order")
                  for i, (path, weights, kind) in enumerate(found)]
    steps = [c.step for c in series]
    if len(set(steps)) != len(steps):
        twice = next(c for c in series if steps.count(c.step) > 1)
        raise CheckpointError(f"two checkpoints are numbered {twice.step} ('{twice.path}' and "
                              "another); probe one series at a time")
    return series


def find_series(paths: list[Path]) -> list[Checkpoint]:
    """The checkpoints of ``paths`` (files, checkpoint folders, folders of them) in order."""
    found: list[tuple[Path, Path, Kind]] = []
    for path in paths:
        if not path.exists():
            raise CheckpointError(f"checkpoint '{path}' does not exist; pass LoRA or model "
                                  ".safetensors files, checkpoint folders, or a folder of them")
        entry = _entry(path)
        if entry is not None:
            found.append((path, *entry))
            continue
        if not path.is_dir():
            raise CheckpointError(f"checkpoint '{path}' is not a .safetensors file; ldmkit "
                                  "never unpickles a .ckpt/.pt/.bin: convert it to safetensors")
        inside = [(child, *e) for child in sorted(path.iterdir()) if not is_hidden(child.name)
                  and not child.is_symlink() and (e := _entry(child)) is not None]
        backups = path / "backup"  # OneTrainer's workspace: backup/ beside save/
        if not inside and backups.is_dir():
            inside = [(child, *e) for child in sorted(backups.iterdir())
                      if not child.is_symlink() and (e := _entry(child)) is not None]
        if not inside:
            raise CheckpointError(f"'{path}' holds no checkpoint (no .safetensors LoRA or model "
                                  "file, no checkpoint folder); point at the trainer's output "
                                  "folder")
        found += inside
    if not found:
        return []
    kinds = {kind for _, _, kind in found}
    if len(kinds) > 1:
        raise CheckpointError("the checkpoints mix LoRAs and full fine-tunes; probe each "
                              "series on its own")
    return order(found)
