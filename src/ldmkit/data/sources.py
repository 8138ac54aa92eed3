"""Datasets as in-memory uint8 tensors, and a batch order that can be resumed exactly.

Images are kept as uint8 ``[N, C, H, W]`` (a 60k-image MNIST at 32x32 is 60 MB) and turned into
float pixels in [-1, 1] per batch. Three sources: scikit-learn's bundled digits (no download),
a folder of PNG/JPEG/WebP files, and MNIST-format IDX files. Labels: the digits' and the IDX
labels file's; a folder's first-level subfolders are its classes (torchvision's ImageFolder
convention) when every image sits in one. A folder's captions (data/captions.py) are read when
the model is text-conditional.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from ldmkit.config import DataConfig
from ldmkit.data.captions import read_captions
from ldmkit.errors import DataError
from ldmkit.platform.files import is_hidden, read_file

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


@dataclass
class ImageData:
    """uint8 images ``[N, C, H, W]``, optional integer labels, and what was skipped on load."""

    images: torch.Tensor
    labels: torch.Tensor | None
    source: str
    skipped: int = 0
    first_skipped: str | None = None
    names: list[str] | None = None  # a folder's files (relative paths), row by row
    classes: list[str] | None = None  # a folder's class names (label i is classes[i])
    hidden: int = 0  # hidden files and folders left out (not data)
    limited_to: int | None = None  # data.limit cut the files read to this many
    captions: list[str] | None = None  # a folder's caption of each image, row by row
    captions_missing: int = 0  # images without one, trained on "" (data.missing_caption: empty)

    def __len__(self) -> int:
        return self.images.shape[0]

    def batch(self, index: torch.Tensor) -> torch.Tensor:
        """Pixels of the images at ``index`` as float32 in [-1, 1]."""
        return to_signed(self.images[index])


def to_signed(images: torch.Tensor) -> torch.Tensor:
    return images.float().div(127.5).sub(1.0)


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)


def _resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize ``[N, C, h, w]`` uint8 to ``size`` x ``size`` with antialiased bilinear filtering."""
    if images.shape[-2:] == (size, size):
        return images
    out = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True)
    return out.round().clamp(0, 255).to(torch.uint8)


def load_digits_data(cfg: DataConfig) -> ImageData:
    """scikit-learn's 1,797 handwritten 8x8 digits (values 0..16), shipped inside the package."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = torch.from_numpy(bunch.images.astype(np.float32) * (255.0 / 16.0))
    images = pixels.round().to(torch.uint8).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    return ImageData(_resize_uint8(images, cfg.image_size), labels, "sklearn digits")


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read IDX file '{path}': {exc}; re-download or fix the file") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"'{path}' is not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    if ndim == 0 or len(raw) < 4 + 4 * ndim:
        raise DataError(f"IDX file '{path}' has a truncated header ({ndim} dimensions); "
                        "re-download or fix the file")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != math.prod(dims):
        raise DataError(f"IDX file '{path}' is truncated: header says {dims}, found {body.size} bytes")
    return body.reshape(dims)


def find_idx(directory: Path, split: str, kind: str) -> Path | None:
    prefix = "train" if split == "train" else "t10k"
    for pattern in (f"{prefix}-{kind}-idx*-ubyte.gz", f"{prefix}-{kind}-idx*-ubyte",
                    f"*{split}*-{kind}-idx*-ubyte*"):
        found = sorted(directory.glob(pattern))
        if found:
            return found[0]
    return None


def load_idx_data(cfg: DataConfig) -> ImageData:
    """MNIST-format files: a directory holding ``*-images-idx3-ubyte[.gz]`` or that file itself."""
    path = Path(cfg.path or "")
    if path.is_dir():
        images_path = find_idx(path, cfg.split, "images")
        if images_path is None:
            raise DataError(
                f"no '*-images-idx3-ubyte[.gz]' file for split '{cfg.split}' in '{path}'; "
                "point data.path at an MNIST-format directory"
            )
    elif path.is_file():
        images_path = path
    else:
        raise DataError(f"data.path '{path}' does not exist; point it at an MNIST-format directory")
    array = _read_idx(images_path)
    if array.ndim != 3:
        raise DataError(f"'{images_path}' holds {array.ndim}-D data; expected images [N, H, W]")
    if 0 in array.shape:
        raise DataError(f"'{images_path}' holds no images (shape {array.shape}); check data.path")
    images = torch.from_numpy(array.copy()).unsqueeze(1)
    labels_path = Path(str(images_path).replace("-images-idx3", "-labels-idx1"))
    labels = None
    if labels_path != images_path and labels_path.is_file():
        labels = torch.from_numpy(_read_idx(labels_path).astype(np.int64))
        if labels.shape != (len(images),):
            raise DataError(f"'{labels_path}' holds {tuple(labels.shape)} labels for "
                            f"{len(images)} images; use the matching labels file")
    return ImageData(_resize_uint8(images, cfg.image_size), labels, f"IDX {images_path}")


def _load_image(path: Path, size: int, mode: str) -> np.ndarray:
    """Decode, resize the short side to ``size`` and center-crop; raises on a corrupt file."""
    with Image.open(path) as img:
        img.load()
        img = img.convert(mode)
        w, h = img.size
        scale = size / min(w, h)
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))),
                         Image.Resampling.BICUBIC)
        w, h = img.size
        left, top = (w - size) // 2, (h - size) // 2
        img = img.crop((left, top, left + size, top + size))
        array = np.asarray(img, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


@dataclass(frozen=True)
class FolderListing:
    """What a folder dataset is made of: its images (sorted relative paths below ``root``), its
    classes (ImageFolder's first-level subfolders, or None when an image sits directly in
    ``root``) and how many hidden entries were left out. The one listing read by the loader and
    the cache key, so both agree on which files are data."""

    root: Path
    files: list[Path]
    classes: list[str] | None
    hidden: int


def list_folder(root: Path) -> FolderListing:
    """Every PNG/JPEG/WebP below ``root``, hidden entries skipped and counted. Linked folders
    are followed (datasets are often assembled from links), each real folder once."""
    if not root.is_dir():
        raise DataError(f"data.path '{root}' is not a directory; point it at a folder of images")
    files, hidden, seen = [], 0, set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        hidden += sum(map(is_hidden, dirnames)) + sum(map(is_hidden, filenames))
        dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
        base = Path(dirpath).relative_to(root)
        files += [base / f for f in filenames if not is_hidden(f)
                  and Path(f).suffix.lower() in IMAGE_SUFFIXES and (Path(dirpath) / f).is_file()]
    files.sort()
    in_folders = files and all(len(f.parts) > 1 for f in files)
    classes = (sorted(p.name for p in root.iterdir() if p.is_dir() and not is_hidden(p.name))
               if in_folders else None)
    return FolderListing(root, files, classes, hidden)


def load_folder_data(cfg: DataConfig, captions: bool = False) -> ImageData:
    """Every PNG/JPEG/WebP below ``cfg.path``, labelled by its class folder when every image sits
    in one, and with ``captions`` captioned (read before any image is decoded, so a missing
    caption fails at once); corrupt files are skipped and counted."""
    listing = list_folder(Path(cfg.path or ""))
    root, classes = listing.root, listing.classes
    files = listing.files if cfg.limit is None else listing.files[: cfg.limit]
    # every image's caption, beyond data.limit too: a metadata.jsonl names them all
    caption_of = dict(zip(map(str, listing.files), read_captions(root, listing.files, cfg),
                          strict=True)) if captions else None
    mode = "L" if cfg.channels == 1 else "RGB"
    arrays, names, skipped, first_bad = [], [], 0, None
    for name in files:
        try:
            arrays.append(_load_image(root / name, cfg.image_size, mode))
            names.append(str(name))
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
            skipped += 1
            first_bad = first_bad or str(root / name)
    if not arrays:
        what = f"{skipped} unreadable files" if skipped else "no PNG/JPEG/WebP files"
        raise DataError(f"no readable image in '{root}' ({what}); check data.path")
    images = torch.from_numpy(np.stack(arrays))
    labels = None
    if classes is not None:
        index = {name: i for i, name in enumerate(classes)}
        labels = torch.tensor([index[Path(n).parts[0]] for n in names], dtype=torch.int64)
    return ImageData(images, labels, f"folder {root}", skipped, first_bad, names, classes,
                     listing.hidden, None if cfg.limit is None else len(files),
                     [caption_of[n] for n in names] if caption_of is not None else None,
                     sum(not caption_of[n] for n in names) if caption_of is not None else 0)


def load_data(cfg: DataConfig, captions: bool = False) -> ImageData:
    """Load the configured dataset (with ``captions``, a folder's captions too); ``cfg.limit``
    keeps the first N images."""
    if cfg.source == "folder":
        data = load_folder_data(cfg, captions)
    else:
        data = {"digits": load_digits_data, "idx": load_idx_data}[cfg.source](cfg)
    if data.images.shape[1] != cfg.channels:
        data.images = (data.images.expand(-1, 3, -1, -1).contiguous() if cfg.channels == 3
                       else data.images.float().mean(1, keepdim=True).round().to(torch.uint8))
    if cfg.limit is not None and len(data) > cfg.limit:
        data.images = data.images[: cfg.limit]
        data.labels = None if data.labels is None else data.labels[: cfg.limit]
        data.names = None if data.names is None else data.names[: cfg.limit]
        data.captions = None if data.captions is None else data.captions[: cfg.limit]
    return data


def source_digest(cfg: DataConfig, captions: bool = False) -> str:
    """SHA-256 of what the dataset is made of, read without decoding an image: a folder's file
    names (so its class folders) and sizes (with ``captions``, each image's caption), an IDX
    images file's size and its labels file's bytes. A latent cache records it, so new, removed,
    relabelled or recaptioned images rebuild the cache."""
    digest = hashlib.sha256(cfg.source.encode())
    if cfg.source == "folder":
        listing = list_folder(Path(cfg.path or ""))
        for name in listing.files:
            digest.update(f"{name}\0{(listing.root / name).stat().st_size}\n".encode())
        if captions:
            digest.update(json.dumps(read_captions(listing.root, listing.files, cfg)).encode())
    elif cfg.source == "idx":
        path = Path(cfg.path or "")
        images = find_idx(path, cfg.split, "images") if path.is_dir() else path
        if images is not None and images.is_file():
            digest.update(str(images.stat().st_size).encode())
            labels = Path(str(images).replace("-images-idx3", "-labels-idx1"))
            if labels != images and labels.is_file():
                digest.update(read_file(labels))
    return digest.hexdigest()


def check_labels(labels: torch.Tensor | None, classes: list[str] | None, num_classes: int,
                 source: str, limited_to: int | None = None) -> None:
    """A class-conditional model (``model.num_classes``) needs a label for every image, each
    below ``num_classes``, and an image of every class; a one-line DataError otherwise."""
    if labels is None:
        raise DataError(f"model.num_classes is {num_classes} but {source} has no labels; put "
                        "each class's images in its own subfolder of data.path, or set "
                        "model.num_classes: null for an unconditional model")
    if classes is not None and len(classes) != num_classes:
        raise DataError(f"{source} has {len(classes)} class folders ({', '.join(classes)[:200]}) "
                        f"but model.num_classes is {num_classes}; set model.num_classes: "
                        f"{len(classes)}")
    if len(labels) and int(labels.max()) >= num_classes:
        raise DataError(f"{source} has label {int(labels.max())}, beyond model.num_classes "
                        f"{num_classes}; set model.num_classes: {int(labels.max()) + 1}")
    counts = torch.bincount(labels, minlength=num_classes)
    if classes is not None and bool((counts == 0).any()):
        empty = classes[int((counts == 0).nonzero()[0])]
        if limited_to is not None:
            raise DataError(f"data.limit keeps the first {limited_to} images of {source}, none "
                            f"of class folder '{empty}'; raise data.limit or remove it")
        raise DataError(f"class folder '{empty}' of {source} holds no readable image; add "
                        "images to it or remove it (and lower model.num_classes)")


class BatchOrder:
    """Shuffled batches, epoch after epoch, whose position is two integers.

    The permutation of epoch ``e`` depends only on ``(seed, e)``, so saving ``(epoch, cursor)``
    in a checkpoint reproduces the exact data order after a resume.
    """

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int = 0, cursor: int = 0):
        if n < 1:
            raise DataError("the dataset is empty")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.cursor = epoch, cursor
        self._perm = self._permutation(epoch)

    def _permutation(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=gen)

    def next(self) -> torch.Tensor:
        """Indices of the next batch; wraps into a new epoch, never returns a short batch."""
        parts, need = [], self.batch_size
        while need:
            take = self._perm[self.cursor : self.cursor + need]
            parts.append(take)
            need -= take.numel()
            self.cursor += take.numel()
            if self.cursor >= self.n:
                self.epoch, self.cursor = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
        return torch.cat(parts)

    def state(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._perm = self._permutation(self.epoch)
