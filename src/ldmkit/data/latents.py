"""Stage 1's output for stage 2: the autoencoder, the encoded dataset, and the latent scale.

The dataset is encoded once by the frozen autoencoder into a memory-mapped cache (posterior mean
and log-variance, ``.npy``), so stage 2 never runs the encoder and a restart or a second run on
the same autoencoder does not even decode the images again. The cache holds the labels beside
the posteriors (and, for a text-conditional model, the captions) and records the SHA-256 of the
autoencoder's weights, the data settings and what the dataset is made of
(``data.source_digest``: files, labels, captions), and is rebuilt when any of them changes.
``data.latent_cache``: ``auto`` (``RUN/latents``), ``off`` (encode in memory), or a directory
shared between runs.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from ldmkit.config import Config, DataConfig
from ldmkit.data.sources import ImageData, check_labels, load_data, source_digest
from ldmkit.data.stage1 import (
    AE_KIND,
    LatentPosteriors,
    autoencoder_dir,
    calibrate_latent_scale,
    is_autoencoder_dir,
    load_autoencoder,
    train_autoencoder,
)
from ldmkit.errors import CheckpointError
from ldmkit.models.autoencoder import Autoencoder, Posterior
from ldmkit.models.hf_text import (
    EncodedCaptions,
    EncoderInfo,
    FrozenTextEncoder,
    encoder_digest,
    encoder_info,
)
from ldmkit.platform.distributed import SINGLE, Dist, barrier, broadcast_float
from ldmkit.platform.fastpath import EAGER_FP32, FastPath, choose
from ldmkit.platform.files import (
    check_output,
    check_replaceable,
    load_tensors,
    open_regular,
    read_json,
    write_dir_atomically,
    write_text_atomic,
)
from ldmkit.platform.preemption import Preempted, StopRequest
from ldmkit.run.layout import RunDir
from ldmkit.vitals.logs.metrics_jsonl import MetricLogger

CACHE_KIND = "latent_cache"
TEXT_FILE = "text.safetensors"  # a frozen text encoder's encodings (models/hf_text.py)
ENCODE_BATCH = 256
# data settings that do not change what is encoded (the cache holds every image)
NOT_ENCODED = ("latent_cache", "val_fraction", "val_max")


def autoencoder_hash(ae_dir: Path) -> str:
    """SHA-256 over the autoencoder's config and weights (ldmkit's or a diffusers VAE's)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in ae_dir.iterdir() if p.suffix in (".json", ".safetensors")):
        digest.update(path.name.encode())
        with open_regular(path) as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def cache_dir(cfg: Config, run_dir: Path) -> Path | None:
    setting = cfg.data.latent_cache
    if setting == "off":
        return None
    return RunDir(run_dir).latent_cache if setting == "auto" else Path(setting)


def wants_captions(cfg: Config) -> bool:
    return bool(cfg.model.text_encoder)


def frozen_encoder(cfg: Config) -> EncoderInfo | None:
    """The frozen text encoder whose encodings the cache holds (None: builtin or none)."""
    if cfg.model.text_encoder in (None, "builtin"):
        return None
    return encoder_info(cfg.model.text_encoder, cfg.model.text_max_length)


def encode_captions(cfg: Config, captions: list[str]) -> EncodedCaptions:
    """Every distinct caption, and the empty one (the null condition), by the frozen encoder:
    once, so that training never runs it."""
    info = frozen_encoder(cfg)
    distinct = list(dict.fromkeys(["", *captions]))
    print(f"text encoder: encoding {len(distinct)} distinct captions with {info.architecture} "
          f"from '{info.path}'")
    return FrozenTextEncoder(info, cfg.model.text_max_length).encode(distinct)


def cache_meta(cfg: Config, ae_dir: Path) -> dict:
    """What a cache must have been built from. The caption settings and ``captioned`` enter
    only for a text-conditional model, so the caches of other runs keep their keys."""
    captioned, info = wants_captions(cfg), frozen_encoder(cfg)
    data = {k: v for k, v in asdict(cfg.data).items() if k not in NOT_ENCODED
            and (captioned or not k.startswith(("caption_", "missing_caption")))}
    encoder = {"text_encoder_sha256": encoder_digest(info),
               "text_max_length": cfg.model.text_max_length} if info else {}
    return {"autoencoder_sha256": autoencoder_hash(ae_dir), "data": data,
            "source_sha256": source_digest(cfg.data, captioned),
            **({"captioned": True} if captioned else {}), **encoder}


def read_cache(path: Path, expected: dict) -> LatentPosteriors | None:
    """The cached posteriors, or None when absent, damaged, or built from another autoencoder
    or data (then the cache, being ldmkit's own, is rebuilt)."""
    try:
        meta = read_json(path / "meta.json")
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or {k: meta.get(k) for k in expected} != expected:
        return None
    try:  # copy-on-write maps: pages are shared and read lazily, never written back
        mean = np.load(path / "mean.npy", mmap_mode="c", allow_pickle=False)
        logvar = np.load(path / "logvar.npy", mmap_mode="c", allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    if mean.dtype != np.float32 or mean.shape != logvar.shape or mean.ndim != 4 \
            or list(mean.shape) != meta.get("shape"):
        return None
    names, classes = meta.get("names"), meta.get("classes")
    if not (isinstance(names, list) and len(names) == len(mean)
            and all(isinstance(n, str) for n in names)):
        names = None
    if not (isinstance(classes, list) and all(isinstance(n, str) for n in classes)):
        classes = None
    captions = meta.get("captions")
    if meta.get("captioned") and not (isinstance(captions, list) and len(captions) == len(mean)
                                      and all(isinstance(c, str) for c in captions)):
        return None
    encoded = None
    if meta.get("text_encoder_sha256"):
        encoded = _read_encoded(path, meta.get("text_captions"))
        if encoded is None:
            return None
    labels = None
    if meta.get("labelled"):
        try:
            labels = torch.from_numpy(np.load(path / "labels.npy", allow_pickle=False))
        except (OSError, ValueError, EOFError):
            return None
        if labels.dtype != torch.int64 or labels.shape != (len(mean),):
            return None
    return LatentPosteriors(torch.from_numpy(mean), torch.from_numpy(logvar), names, labels,
                            classes, captions if meta.get("captioned") else None, encoded)


def _read_encoded(path: Path, captions: object) -> EncodedCaptions | None:
    if not (isinstance(captions, list) and all(isinstance(c, str) for c in captions)):
        return None
    try:
        tensors = load_tensors(path / TEXT_FILE)
    except (OSError, SafetensorError, ValueError):
        return None
    return EncodedCaptions.from_tensors(captions, tensors)


def encoding_path(cfg: Config) -> FastPath:
    """Encoding runs once over the data: bf16 where ``train.precision`` chooses it (2.1x
    faster on this project's CPU, BENCHMARKS.md; the posteriors stay fp32, and bf16's rounding
    is below their own noise), never compiled (one pass never pays for it)."""
    return choose(cfg.train.precision, False, torch.device("cpu"), "encode", 0)


@torch.no_grad()
def encode_batches(ae: Autoencoder, data: ImageData, fast: FastPath = EAGER_FP32
                   ) -> Iterator[tuple[slice, Posterior]]:
    """(rows, posterior) of ``data`` encoded ``ENCODE_BATCH`` images at a time."""
    for start in range(0, len(data), ENCODE_BATCH):
        stop = min(start + ENCODE_BATCH, len(data))
        with fast.autocast():
            post = ae.encode(data.batch(torch.arange(start, stop)))
        yield slice(start, stop), post


@torch.no_grad()
def build_cache(ae: Autoencoder, cfg: Config, path: Path, meta: dict,
                data: LazyData | None = None) -> LatentPosteriors:
    """Encode ``cfg.data`` into ``path`` (written atomically) and return the mapped result."""
    data = (data or LazyData.of(cfg)).get()
    size = cfg.data.image_size // ae.downsample_factor
    shape = (len(data), ae.latent_channels, size, size)

    def write(tmp: Path) -> None:
        mean = np.lib.format.open_memmap(tmp / "mean.npy", "w+", np.float32, shape)
        logvar = np.lib.format.open_memmap(tmp / "logvar.npy", "w+", np.float32, shape)
        for index, post in encode_batches(ae, data, encoding_path(cfg)):
            mean[index], logvar[index] = post.mean.numpy(), post.logvar.numpy()
        mean.flush()
        logvar.flush()
        del mean, logvar
        if data.labels is not None:
            np.save(tmp / "labels.npy", data.labels.numpy().astype(np.int64))
        extra = {"labelled": data.labels is not None,
                 **_write_encoded(cfg, data, tmp, meta),
                 **({"names": data.names} if data.names is not None else {}),
                 **({"classes": data.classes} if data.classes is not None else {}),
                 **({"captions": data.captions} if meta.get("captioned") else {})}
        (tmp / "meta.json").write_text(json.dumps({**meta, "shape": list(shape), **extra},
                                                  indent=2))

    path.parent.mkdir(parents=True, exist_ok=True)
    write_dir_atomically(path, write, CACHE_KIND)
    return read_cache(path, meta)


def _write_encoded(cfg: Config, data: ImageData, tmp: Path, meta: dict) -> dict:
    """A frozen encoder's encodings into the cache (``text.safetensors``); its meta entry."""
    if not meta.get("text_encoder_sha256"):
        return {}
    encoded = encode_captions(cfg, data.captions)
    save_file(encoded.tensors(), str(tmp / TEXT_FILE))
    return {"text_captions": encoded.captions}


def encode_in_memory(ae: Autoencoder, data: ImageData, fast: FastPath = EAGER_FP32
                     ) -> LatentPosteriors:
    posts = [post for _, post in encode_batches(ae, data, fast)]
    return LatentPosteriors(torch.cat([p.mean for p in posts]), torch.cat([p.logvar for p in posts]),
                            data.names, data.labels, data.classes, data.captions)


def _report(data: ImageData) -> None:
    print(f"data: {len(data)} images from {data.source}, {tuple(data.images.shape[1:])}")
    if data.skipped:
        print(f"data: skipped {data.skipped} unreadable images (first: {data.first_skipped})")
    if data.captions is not None:
        print(f"data: {len(set(data.captions))} distinct captions"
              + (f"; {data.captions_missing} images had none and train on the empty caption"
                 if data.captions_missing else ""))
    if data.hidden:
        print(f"data: left out {data.hidden} hidden files and folders (.ipynb_checkpoints, "
              ".DS_Store, __MACOSX and the like are not data)")


class LazyData:
    """The dataset, loaded (and reported) on first use only: a valid cache never needs it.
    For a class-conditional model (``num_classes``) its labels are checked as it loads, before
    stage 1 trains on it; a text-conditional one (``captions``) reads the captions first."""

    def __init__(self, cfg: DataConfig, num_classes: int | None = None, captions: bool = False):
        self.cfg, self.num_classes, self.captions, self._data = cfg, num_classes, captions, None

    @classmethod
    def of(cls, cfg: Config) -> LazyData:
        """The data the run's model needs: labels checked, or captions read."""
        return cls(cfg.data, cfg.model.num_classes, wants_captions(cfg))

    def get(self) -> ImageData:
        if self._data is None:
            data = load_data(self.cfg, self.captions)
            _report(data)
            if self.num_classes:
                check_labels(data.labels, data.classes, self.num_classes, data.source,
                             data.limited_to)
            self._data = data
        return self._data


def encoded_dataset(ae: Autoencoder, cfg: Config, run_dir: Path, data: LazyData,
                    d: Dist = SINGLE, path: Path | None = None) -> LatentPosteriors:
    """The dataset's posteriors: from the cache when it matches, else encoded (rank 0 builds)."""
    path = path or cache_dir(cfg, run_dir)
    if path is None:
        latents = encode_in_memory(ae, data.get(), encoding_path(cfg))
        if frozen_encoder(cfg):
            latents = replace(latents, encoded=encode_captions(cfg, latents.captions))
        return latents
    check_replaceable(path, CACHE_KIND)
    meta = cache_meta(cfg, RunDir(run_dir).autoencoder)
    if d.is_main:
        latents = read_cache(path, meta)
        if latents is None:
            print(f"latent cache: encoding the dataset into {path}")
            latents = build_cache(ae, cfg, path, meta, data)
        else:
            print(f"latent cache: reusing {path} ({len(latents.mean)} latents)")
    barrier(d)
    if not d.is_main:
        latents = read_cache(path, meta)
        if latents is None:
            raise CheckpointError(f"latent cache '{path}' is not visible from rank {d.rank}; "
                                  "put the run directory on storage every node shares")
    return latents


def stage1_autoencoder(cfg: Config, run_dir: Path, logger: MetricLogger, data: LazyData,
                       stop: StopRequest | None, d: Dist = SINGLE) -> Autoencoder:
    """Reuse the run's autoencoder, copy a pretrained one in, or train it (rank 0; the other
    ranks wait, and stop with it if it is preempted)."""
    own, preempted = RunDir(run_dir).autoencoder, None
    if d.is_main and not is_autoencoder_dir(own):
        if cfg.autoencoder.pretrained:
            load_autoencoder(cfg.autoencoder.pretrained)  # fails early on a broken one
            # the run keeps its own copy, so sampling and resume never depend on an outside path
            source = autoencoder_dir(cfg.autoencoder.pretrained)
            write_dir_atomically(own, lambda tmp: shutil.copytree(source, tmp, dirs_exist_ok=True),
                                 AE_KIND)
        else:
            try:
                train_autoencoder(cfg, data.get(), run_dir, logger, stop)
            except Preempted as exc:
                preempted = exc
    barrier(d)
    if broadcast_float(1.0 if preempted else 0.0, d):
        raise preempted or Preempted("autoencoder", 0, "SIGTERM")
    ae = load_autoencoder(own)
    if ae.in_channels != cfg.data.channels:
        raise CheckpointError(f"the autoencoder takes {ae.in_channels}-channel images but "
                              f"data.channels is {cfg.data.channels}; set data.channels")
    return ae


def prepare_latents(cfg: Config, run_dir: Path, logger: MetricLogger,
                    stop: StopRequest | None = None, d: Dist = SINGLE,
                    data: LazyData | None = None) -> tuple[Autoencoder, LatentPosteriors, float]:
    """Stage 1 (reuse or train), the encoded dataset, and the latent scale (calibrated if null)."""
    num_classes = cfg.model.num_classes
    data = data or LazyData.of(cfg)
    ae = stage1_autoencoder(cfg, run_dir, logger, data, stop, d)
    latents = encoded_dataset(ae, cfg, run_dir, data, d)
    if num_classes:
        check_labels(latents.labels, latents.classes, num_classes,
                     f"data '{cfg.data.path or cfg.data.source}'", cfg.data.limit)
        if latents.classes and d.is_main:
            write_text_atomic(RunDir(run_dir).classes_file, json.dumps(latents.classes))
    scale = cfg.diffusion.latent_scale_factor
    if scale is None:
        scale = calibrate_latent_scale(latents, cfg.autoencoder.calibration_batches,
                                       cfg.train.batch_size, cfg.seed + 3, d)
        scale = broadcast_float(scale, d)
        print(f"latent_scale_factor calibrated: {scale:.4f}")
    return ae, latents, scale


def data_needed(cfg: Config, run_dir: Path) -> bool:
    """Whether the run will read the images: to train stage 1, or to encode them because no
    cache of this autoencoder and data exists yet."""
    own = RunDir(run_dir).autoencoder
    ae_dir = own if is_autoencoder_dir(own) else (
        autoencoder_dir(cfg.autoencoder.pretrained) if cfg.autoencoder.pretrained else None)
    path = cache_dir(cfg, run_dir)
    if ae_dir is None or path is None or not (path / "meta.json").is_file():
        return True
    return read_cache(path, cache_meta(cfg, ae_dir)) is None


def check_stage1_paths(cfg: Config, run_dir: Path, cache: Path | None) -> None:
    """Before a run writes anything: the autoencoder and cache directories it would write are
    absent or ldmkit's own (``files.check_replaceable``)."""
    if not is_autoencoder_dir(RunDir(run_dir).autoencoder):
        check_replaceable(RunDir(run_dir).autoencoder, AE_KIND)
    if cache is not None:
        check_replaceable(cache, CACHE_KIND)


def encode_run(run_dir: Path, out: Path | None = None) -> Path:
    """``ldmkit encode``: build (or verify) the latent cache of a trained run's autoencoder."""
    from ldmkit.run.layout import writing_run

    cfg = RunDir(run_dir).load_config()
    path = out or cache_dir(cfg, run_dir) or RunDir(run_dir).latent_cache
    if out is not None:
        check_output(out, "--out", directory=True)
    check_replaceable(path, CACHE_KIND)
    with writing_run(run_dir):
        ae = load_autoencoder(RunDir(run_dir).autoencoder)
        encoded_dataset(ae, cfg, run_dir, LazyData.of(cfg), path=path)
    return path
