"""A small classifier trained in-project on a dataset's labels: the feature extractor of
``ldmkit eval`` (no Inception download), cached per dataset.

Its penultimate layer (128 features) feeds the Frechet distance, precision/recall and
memorization; its predictions give class coverage. Real images are split in two by a fixed
permutation: the classifier trains on one part, and the other is the held-out real set the
samples are compared with (for IDX files with a test split, that split).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

from ldmkit.config import DataConfig
from ldmkit.data.sources import ImageData, load_data
from ldmkit.errors import DataError
from ldmkit.platform.files import load_tensors, read_json, write_dir_atomically

FEATURES = 128
EPOCHS = 4


class FeatureNet(nn.Module):
    def __init__(self, channels: int, classes: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.SiLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(64 * 16, FEATURES), nn.SiLU())
        self.head = nn.Linear(FEATURES, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclass
class Classifier:
    net: FeatureNet
    classes: int
    held_out_accuracy: float

    @torch.no_grad()
    def embed(self, images: torch.Tensor, batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
        """(features ``[N, 128]``, predicted classes ``[N]``) of pixels in [-1, 1]."""
        self.net.eval()
        feats = torch.cat([self.net.features(x) for x in images.split(batch)])
        return feats, self.net.head(feats).argmax(1)


def cache_root() -> Path:
    return Path(os.environ.get("LDMKIT_CACHE", Path.home() / ".cache" / "ldmkit")) / "classifiers"


def split_real(cfg: DataConfig) -> tuple[ImageData, ImageData]:
    """(images to train the classifier on, held-out real images), both labelled."""
    train = load_data(dataclasses.replace(cfg, split="train", limit=None))
    if train.labels is None:
        raise DataError(f"ldmkit eval needs class labels and {train.source} has none; use "
                        "digits, MNIST, Fashion-MNIST or a folder with one subfolder per class")
    if cfg.source == "idx":
        try:
            test = load_data(dataclasses.replace(cfg, split="test", limit=None))
            if test.labels is not None:
                return train, test
        except DataError:
            pass
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(1234))
    cut = int(0.8 * len(train))
    pick = lambda idx: ImageData(train.images[idx], train.labels[idx], train.source)  # noqa: E731
    return pick(perm[:cut]), pick(perm[cut:])


def _key(cfg: DataConfig) -> str:
    fields = {k: v for k, v in dataclasses.asdict(cfg).items()
              if k in ("source", "path", "image_size", "channels")}
    if cfg.path:
        fields["path"] = str(Path(cfg.path).resolve())
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def train_classifier(train: ImageData, held_out: ImageData, seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    classes = int(max(train.labels.max(), held_out.labels.max()).item()) + 1
    net = FeatureNet(train.images.shape[1], classes)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(EPOCHS):
        for idx in torch.randperm(len(train), generator=gen).split(128):
            loss = F.cross_entropy(net(train.batch(idx)), train.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    clf = Classifier(net, classes, 0.0)
    _, predicted = clf.embed(held_out.batch(torch.arange(len(held_out))))
    clf.held_out_accuracy = (predicted == held_out.labels).float().mean().item()
    return clf


def load_or_train(cfg: DataConfig) -> tuple[Classifier, ImageData, ImageData]:
    """The dataset's classifier (cached under ``$LDMKIT_CACHE``), and the two real sets.

    Inside a fork of torch's generator (building the network draws from it, and training
    seeds it): whether the classifier was cached or trained never changes the randomness of a
    training run that evaluates."""
    with torch.random.fork_rng(devices=[]):
        return _load_or_train(cfg)


def _load_or_train(cfg: DataConfig) -> tuple[Classifier, ImageData, ImageData]:
    train, held_out = split_real(cfg)
    path = cache_root() / _key(cfg)
    try:
        meta = read_json(path / "meta.json")
        net = FeatureNet(meta["channels"], meta["classes"])
        net.load_state_dict(load_tensors(path / "weights.safetensors"))
        return Classifier(net, meta["classes"], meta["held_out_accuracy"]), train, held_out
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError):
        pass  # absent or damaged: trained again and rewritten
    clf = train_classifier(train, held_out)
    write_cached(path, clf.net, {"channels": train.images.shape[1], "classes": clf.classes,
                                 "held_out_accuracy": clf.held_out_accuracy,
                                 "data": dataclasses.asdict(cfg)}, "classifier")
    return clf, train, held_out


def write_cached(path: Path, net: nn.Module, meta: dict, kind: str) -> None:
    """An evaluation model into the cache: ``weights.safetensors`` and ``meta.json``, written
    atomically (a directory ldmkit owns as ``kind``)."""

    def write(tmp: Path) -> None:
        save_file(net.state_dict(), str(tmp / "weights.safetensors"))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))

    path.parent.mkdir(parents=True, exist_ok=True)
    write_dir_atomically(path, write, kind)
