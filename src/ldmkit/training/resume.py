"""Resume policy: how a training command opens a run directory, what may change when a run
continues, and the record of what did (``RUN/changes.jsonl``)."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from ldmkit.config import Config, load_config, to_dict
from ldmkit.config.untrusted import brief
from ldmkit.data.stage1 import load_autoencoder
from ldmkit.errors import CheckpointError
from ldmkit.platform.files import check_plain_tree
from ldmkit.run.checkpoint import (
    load_checkpoint,
    step_of,
)
from ldmkit.run.layout import CONFIG_FILE, RunDir, check_new_run_dir, is_run
from ldmkit.sampling.trained import backbone_from, run_backbone

# what rerunning the same command may change: the run's length
CONTINUABLE = ("train.steps",)
# what --resume may not change, and why; the rest (train.*, diffusion.*, sample.*, vitals.*,
# device, ...) alters the run from the checkpoint on, as the findings' fixes advise (a lower
# train.lr, another latent_scale_factor or t_sampling), and is recorded in RUN/changes.jsonl
FIXED_ON_RESUME = (
    ("data", "the latent cache, the data order and the checkpoint's data position belong to "
             "this dataset"),
    ("autoencoder", "stage 1 is trained and the latents are encoded with it"),
    ("model", "the checkpoint holds this architecture's weights"),
    ("seed", "the data order and noise of the run follow from it"),
    ("diffusion.objective", "the checkpoint's network predicts this objective's target"),
    ("diffusion.schedule", "the checkpoint's network learned this noise path"),
)


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(a) | set(b)):
        name = prefix + key
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            keys += _differences(a[key], b[key], name + ".")
        elif a.get(key) != b.get(key) and name != "run_dir":
            keys.append(name)
    return keys


def _fixed_on_resume(key: str) -> str | None:
    """Why ``key`` cannot change when a run continues, or None when it may."""
    for prefix, why in FIXED_ON_RESUME:
        if key == prefix or key.startswith(prefix + "."):
            return why
    return None


@dataclass
class OpenedRun:
    """What a training command works on: the directory, the config, whether it continues a
    run, its checkpoint, and the keys changed on resume (``{key: [before, now]}``)."""

    run_dir: Path
    cfg: Config
    continuing: bool
    ckpt: Path | None = None
    changes: dict[str, list] = dataclasses.field(default_factory=dict)


def open_run(cfg: Config, run_dir: Path | None, resume: bool) -> OpenedRun:
    """Validate where a training command writes, before it writes anything.

    ``resume``, or the same config pointed at a directory that already holds its run (rerunning
    a preempted command), continues that run. Rerunning may change only ``train.steps``;
    ``--resume`` may change what does not alter what the checkpoint means (``FIXED_ON_RESUME``
    lists what it may not), and the changes are printed and recorded in the run. A fresh run
    goes into a new or empty directory only (``run.layout.check_new_run_dir``).
    """
    chosen = run_dir or (Path(cfg.run_dir) if cfg.run_dir else None)
    if chosen is None:
        stem = Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        chosen, i = stem, 1
        while chosen.exists():
            chosen, i = Path(f"{stem}-{i}"), i + 1
        check_new_run_dir(chosen)
        return OpenedRun(chosen, cfg, False)
    if not is_run(chosen) or not (chosen / CONFIG_FILE).is_file():
        if resume:
            raise CheckpointError(f"'{chosen}' is not an ldmkit run directory (no {CONFIG_FILE})")
        check_new_run_dir(chosen)
        return OpenedRun(chosen, cfg, False)
    check_plain_tree(chosen)
    saved = load_config(chosen / CONFIG_FILE, saved=True)
    if cfg.diffusion.latent_scale_factor is None:  # calibrated when the run started
        cfg = dataclasses.replace(cfg, diffusion=dataclasses.replace(
            cfg.diffusion, latent_scale_factor=saved.diffusion.latent_scale_factor))
    diff = _differences(to_dict(saved), to_dict(cfg))
    refused = [k for k in diff if (_fixed_on_resume(k) if resume else k not in CONTINUABLE)]
    if refused:
        key = refused[0]
        there, here = brief(_get(saved, key)), brief(_get(cfg, key))
        if resume:
            raise CheckpointError(f"cannot change {key} when resuming ({there} -> {here}): "
                                  f"{_fixed_on_resume(key)}; start a new run instead "
                                  f"(autoencoder.pretrained: {chosen} reuses its stage 1)")
        raise CheckpointError(f"run directory '{chosen}' already holds a run with another config "
                              f"({key}: {there} there, {here} here); continue it with `ldmkit "
                              f"train --resume {chosen}` or choose another run_dir")
    changes = {k: [_get(saved, k), _get(cfg, k)] for k in diff}
    return OpenedRun(chosen, cfg, True, RunDir(chosen).latest_checkpoint_or_none(), changes)


def record_changes(opened: OpenedRun) -> None:
    """Print and append to ``RUN/changes.jsonl`` what ``--resume --set`` changed."""
    if not opened.changes:
        return
    step = step_of(opened.ckpt)
    print("resume: changed " + ", ".join(f"{k} {brief(a)} -> {brief(b)}"
                                         for k, (a, b) in opened.changes.items()))
    RunDir(opened.run_dir).log_change({"at_step": step, "changed": opened.changes})


def check_checkpoint(cfg: Config, run_dir: Path, ckpt: Path) -> None:
    """Before a resume writes anything: the checkpoint is readable (``load_checkpoint`` checks
    its meta.json) and its weights fit this config's model."""
    weights, _, _ = load_checkpoint(ckpt)
    backbone_from(run_backbone(cfg, load_autoencoder(RunDir(run_dir).autoencoder)), weights, "model.",
                  f"checkpoint '{ckpt}' does not match this config's model", "resume with the "
                  "run's own config")


def _get(cfg: Config, dotted: str) -> object:
    node: object = to_dict(cfg)
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


