"""A deterministic validation loss, per noise level.

The training loss of a diffusion model says little from one interval to the next: it is
dominated by which noise levels a batch happened to draw (the guide's diffusion/t_mean row says
why: low and high t are not equally hard). So a fixed set is drawn once per run and stored in
``RUN/validation.safetensors``: held-out images (``data.val_fraction``, at most ``data.val_max``;
an IDX test file instead when there is one), ``POINTS`` timesteps stratified over [0, 1], one
noise tensor per point. Every ``train.val_every`` steps the same points are scored with the raw
and the EMA weights, and with the same noise and timesteps on a fixed sample of training images
(``validation/train_loss``), so the gap between training and held-out loss is not blurred by
different noise levels (kohya's sd-scripts, OneTrainer and SimpleTuner added such a loss in
2025). Rank 0 evaluates in fixed chunks: the values depend on the weights only, not on the
number of processes, and are the same after a resume.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from ldmkit.conditioning.sources import ConditionSource
from ldmkit.config import Config, DataConfig
from ldmkit.data.sources import find_idx, load_data
from ldmkit.data.stage1 import LatentPosteriors
from ldmkit.diffusion import condition
from ldmkit.diffusion.condition import LABELS, NULL_LABEL, Cond
from ldmkit.diffusion.parameterization import Net, Parameterization
from ldmkit.errors import DataError
from ldmkit.models.autoencoder import Autoencoder
from ldmkit.platform.files import parse_json, read_json, read_regular, write_bytes_atomic
from ldmkit.run.layout import RunDir
from ldmkit.vitals import metrics as vm

POINTS = 1000  # fixed (image, t, noise) points: 100 per noise-level bucket
PROBE_MIN = 64  # training images the train_loss probe uses (all when fewer)
CHUNK = 250
VERSION = "2"  # 1 stored each point's image index, always the point's own index


@dataclass(frozen=True)
class Split:
    """Dataset indices stage 2 trains on, and those held out for validation."""

    train: torch.Tensor  # [n_train] int64, sorted
    held_out: torch.Tensor  # [n_val] int64, sorted; empty when a test file validates


def test_images_path(cfg: DataConfig) -> Path | None:
    """An IDX test file beside a training file: the natural validation set."""
    if cfg.source != "idx" or cfg.split != "train" or not cfg.path or not Path(cfg.path).is_dir():
        return None
    return find_idx(Path(cfg.path), "test", "images")


def split(n: int, cfg: Config) -> Split:
    """Hold out ``min(val_max, floor(val_fraction * n))`` images by a permutation of the seed,
    or none when the IDX test file is the validation set (``data.val_fraction: 0`` trains on
    all; with ``train.val_every: 0`` they stay held out)."""
    everything = torch.arange(n)
    k = min(cfg.data.val_max, int(cfg.data.val_fraction * n))
    if test_images_path(cfg.data) is not None or k == 0 or k >= n:
        return Split(everything, everything[:0])
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + 7))
    return Split(perm[k:].sort().values, perm[:k].sort().values)


def run_split(cfg: Config, run_dir: Path, latents: LatentPosteriors, is_main: bool = True
              ) -> Split:
    """The run's split, fixed for its life: drawn when it starts and kept in ``RUN/split.json``
    (the held-out rows and, for a folder, their files). When the dataset changed under the run,
    its held-out images stay held out by file (removed ones are gone, new ones are trained on)
    and it says so; a dataset without file names is refused: its split cannot be kept."""
    path, n, names = RunDir(run_dir).split_file, len(latents.mean), latents.names
    stored = _read_split(path)
    if stored is None:
        drawn = split(n, cfg)
        if is_main:
            write_bytes_atomic(path, json.dumps({
                "version": 1, "size": n, "held_out": drawn.held_out.tolist(),
                "held_out_names": None if names is None else
                [names[i] for i in drawn.held_out.tolist()]}).encode())
        return drawn
    rows, kept_names = stored["held_out"], stored["held_out_names"]
    unchanged = stored["size"] == n and (
        kept_names is None or names is not None
        and all(r < n and names[r] == f for r, f in zip(rows, kept_names, strict=True)))
    if not unchanged and (kept_names is None or names is None):
        raise DataError(f"the dataset of run '{run_dir}' changed since the run started "
                        f"({stored['size']} images, now {n}), and its images have no file names "
                        "to keep the held-out split by: restore the data, or start a new run")
    if not unchanged:
        index = {name: row for row, name in enumerate(names)}
        rows = sorted(index[f] for f in kept_names if f in index)
        if is_main:
            print(f"validation: the dataset changed since the run started ({stored['size']} "
                  f"images, now {n}); the held-out split is kept by file: {len(rows)} of its "
                  f"{len(kept_names)} images remain held out, new images are trained on")
    held = torch.tensor(rows, dtype=torch.int64)
    mask = torch.ones(n, dtype=torch.bool)
    mask[held] = False
    return Split(torch.arange(n)[mask], held)


def _read_split(path: Path) -> dict | None:
    """``split.json``, or None when absent; a damaged one is a one-line error (guessing a
    split would train on held-out images)."""
    if not path.exists():
        return None
    try:
        stored = read_json(path)
        size, rows, names = stored["size"], stored["held_out"], stored["held_out_names"]
        ok = (type(size) is int and size >= 0 and isinstance(rows, list)
              and all(type(r) is int and 0 <= r < size for r in rows)
              and rows == sorted(set(rows))
              and (names is None or isinstance(names, list) and len(names) == len(rows)
                   and all(isinstance(f, str) for f in names)))
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise DataError(f"'{path}' is damaged; it fixes which images the run holds out: "
                        "restore it from a backup, or start a new run")
    return stored


@dataclass
class ValidationSet:
    """The fixed points: point ``k`` scores image ``k % len(latents)`` at ``t[k]``."""

    latents: torch.Tensor  # [N, C, h, w] posterior means of the validation images (unscaled)
    probe: torch.Tensor  # [M, C, h, w] posterior means of a fixed sample of training images
    t: torch.Tensor  # [K] stratified: one point in each of K equal strata of [0, 1]
    eps: torch.Tensor  # [K, C, h, w]
    held_out: torch.Tensor  # [N] dataset indices (empty for a test file)
    labels: torch.Tensor  # [N] class of each validation image (NULL_LABEL: none)
    probe_labels: torch.Tensor  # [M]
    probe_rows: torch.Tensor  # [M] dataset indices of the probe (its captions)
    source: str

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name).contiguous() for f in dataclasses.fields(self)
                if f.name != "source"}


@torch.no_grad()
def draw(cfg: Config, parts: Split, latents: LatentPosteriors, ae: Autoencoder
         ) -> ValidationSet | None:
    """Draw the fixed points (own generator: the training draws are unchanged)."""
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 8)
    test_path = test_images_path(cfg.data)
    known = latents.labels if latents.labels is not None else \
        torch.full((len(latents.mean),), NULL_LABEL)
    if test_path is not None:
        test = load_data(dataclasses.replace(cfg.data, split="test", limit=cfg.data.val_max))
        rows = torch.arange(min(len(test), cfg.data.val_max))
        val = torch.cat([ae.encode(x).mean for x in test.batch(rows).split(256)])
        labels = test.labels[rows] if test.labels is not None else torch.full_like(rows, NULL_LABEL)
        source = f"{len(val)} images of the test file {test_path.name}"
    elif len(parts.held_out):
        val, labels = latents.mean[parts.held_out].clone(), known[parts.held_out].clone()
        source = f"{len(val)} of {len(latents.mean)} images held out (data.val_fraction)"
    else:
        return None
    pick = torch.randperm(len(parts.train), generator=gen)[:max(PROBE_MIN, len(val))]
    probe_rows = parts.train[pick.sort().values]
    probe = latents.mean[probe_rows].clone()
    t = (torch.arange(POINTS, dtype=torch.float64) + torch.rand(POINTS, generator=gen,
                                                                 dtype=torch.float64)) / POINTS
    eps = torch.randn((POINTS, *val.shape[1:]), generator=gen)
    return ValidationSet(val, probe, t.float(), eps, parts.held_out, labels,
                         known[probe_rows].clone(), probe_rows.clone(), source)


def save(vset: ValidationSet, path: Path) -> None:
    write_bytes_atomic(path, save_safetensors(vset.tensors(), {"source": vset.source,
                                                               "version": VERSION}))


def load(path: Path) -> ValidationSet | None:
    """The stored set, or None when it is absent or unreadable."""
    try:
        raw = read_regular(path)
        tensors = load_safetensors(raw)
        meta = parse_json(raw[8:8 + int.from_bytes(raw[:8], "little")]).get("__metadata__", {})
        return ValidationSet(**tensors, source=str(meta.get("source", "")))
    except (OSError, SafetensorError, ValueError, TypeError, AttributeError):
        return None


DRAWN_FROM_SEED = ("t", "eps", "held_out", "labels", "probe_labels", "probe_rows")


def matches(stored: ValidationSet, drawn: ValidationSet) -> bool:
    """Whether the stored set is the one drawn for this run's split: what comes from the seed
    and the split (timesteps, noise, rows, labels) is equal, dtypes included; the encoded
    images, which the stored set keeps as the run's record, have the drawn shape and dtype and
    are finite."""
    for name in DRAWN_FROM_SEED:
        a, b = getattr(stored, name), getattr(drawn, name)
        if a.dtype != b.dtype or not torch.equal(a, b):
            return False
    return all(getattr(stored, name).shape == getattr(drawn, name).shape
               and getattr(stored, name).dtype == getattr(drawn, name).dtype
               and bool(torch.isfinite(getattr(stored, name)).all())
               for name in ("latents", "probe"))


def prepare(cfg: Config, run_dir: Path, parts: Split, latents: LatentPosteriors,
            ae: Autoencoder) -> ValidationSet | None:
    """The run's validation set (rank 0 only): the stored ``RUN/validation.safetensors`` when
    it is the set drawn for this split (``matches``), else drawn from the seed and stored. An
    edited file is never used: it would feed out-of-range labels or timesteps to the model."""
    if cfg.train.val_every == 0:
        return None
    try:
        drawn = draw(cfg, parts, latents, ae)
    except DataError as exc:
        print(f"validation: off ({exc})")
        return None
    if drawn is None:
        print(f"validation: off (data.val_fraction {cfg.data.val_fraction} of "
              f"{len(latents.mean)} images holds out none; raise it)")
        return None
    path = RunDir(run_dir).validation
    stored = load(path) if path.exists() else None
    if stored is not None and not matches(stored, drawn):
        print(f"validation: '{path}' is not the set drawn for this run's split (changed "
              "data, or an edited file); it is drawn again from the seed")
        stored = None
    if stored is None:
        save(drawn, path)
    print(f"validation: {drawn.source}, {POINTS} fixed points, every {cfg.train.val_every} steps")
    return stored or drawn


@torch.no_grad()
def conditions(vset: ValidationSet, source: ConditionSource) -> tuple[Cond, Cond]:
    """The condition of each validation image and of each probe image: the stored labels of a
    class-conditional model (a test file's own), the source's rows (captions) otherwise."""
    if source.kind == "class":
        return {LABELS: vset.labels}, {LABELS: vset.probe_labels}
    return source.rows(vset.held_out), source.rows(vset.probe_rows)


def _score(forward: Net, param: Parameterization, x0: torch.Tensor, given: Cond,
           vset: ValidationSet, scale: float, device: torch.device
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per point ``[K]``: the objective's loss, the noise MSE, the cosine of predicted and true
    noise (the loss unweighted: a weighting would make noise levels incomparable). ``given``:
    the condition of each image of ``x0`` (``{}``: none)."""
    losses, eps_mse, cosines = [], [], []
    for rows in torch.arange(len(vset.t)).split(CHUNK):
        z0 = scale * x0[rows % len(x0)].to(device)
        t, eps = vset.t[rows].to(device), vset.eps[rows].to(device)
        cond = {key: value.to(device)
                for key, value in condition.rows(given, rows % len(x0)).items()}
        out = param.loss(forward, z0, t, eps, cond)
        err = (out.eps_pred.float() - eps).pow(2).flatten(1).mean(1)
        cos = vm.cos_eps(out.eps_pred, eps)
        losses.append(out.per_sample.double().cpu())
        eps_mse.append(err.double().cpu())
        cosines.append(cos.double().cpu())
    return torch.cat(losses), torch.cat(eps_mse), torch.cat(cosines)


def measure(model: nn.Module, ema_model: nn.Module, wrap: Callable[[nn.Module], Net],
            param: Parameterization, vset: ValidationSet, scale: float,
            source: ConditionSource) -> dict[str, float]:
    """``validation/*`` (raw weights) and ``validation_ema/*`` (EMA weights) of the fixed set;
    a conditional model is scored given each image's class or caption.

    Eval mode (no dropout) and no RNG draw: training continues exactly as without it.
    """
    device = next(model.parameters()).device
    val_cond, probe_cond = conditions(vset, source)
    bucket = (vset.t * vm.VAL_BUCKETS).long().clamp(max=vm.VAL_BUCKETS - 1)
    values: dict[str, float] = {}
    for prefix, net in ((vm.VAL_PREFIX, model), (vm.VAL_EMA_PREFIX, ema_model)):
        was_training = net.training
        net.eval()
        try:
            loss, eps_mse, cos = _score(wrap(net), param, vset.latents, val_cond, vset,
                                        scale, device)
            if prefix == vm.VAL_PREFIX:
                values[vm.VAL_TRAIN_LOSS] = _score(wrap(net), param, vset.probe, probe_cond,
                                                   vset, scale, device)[0].mean().item()
        finally:
            net.train(was_training)
        values[prefix + "loss"] = loss.mean().item()
        values[prefix + "eps_mse"] = eps_mse.mean().item()
        values[prefix + "cos_eps_mean"] = cos.mean().item()
        for k in range(vm.VAL_BUCKETS):
            values[vm.val_bucket_tag(k, prefix)] = loss[bucket == k].mean().item()
    return values
