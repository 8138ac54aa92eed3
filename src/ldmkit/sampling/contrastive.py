"""A small contrastive image-text model trained in-project on a captioned dataset: how well a
text-to-image model's samples follow their prompts, with no CLIP download.

CLIP score (Hessel et al. 2021) and retrieval need an embedding of images and captions in
one space. Pretrained CLIP would have to be downloaded and knows nothing of a 16x16 digit or a
64x64 emoji, so, as ``ldmkit eval`` trains its own classifier instead of loading Inception
(sampling/classifier.py), this trains its own CLIP (Radford et al. 2021): the classifier's
convolutional tower for images and the built-in byte encoder (models/text.py) for captions,
projected to ``EMBED`` dimensions, with the symmetric contrastive loss and a learned
temperature. Images sharing a caption are all positives of it (a dataset's captions repeat;
CLIP's one-hot targets would push them apart). It trains on 80 % of the captioned images
(fixed permutation) and is cached per dataset and captions under ``$LDMKIT_CACHE``; the other
20 % give the real-image ceiling the samples' figures are read against, as the classifier's own
accuracy is for ``eval/class_accuracy``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn

from ldmkit.config import DataConfig
from ldmkit.data.sources import ImageData, load_data, source_digest, to_signed
from ldmkit.errors import DataError
from ldmkit.models.text import ByteTextEncoder, tokenize
from ldmkit.platform.files import load_tensors, read_json
from ldmkit.sampling.classifier import FeatureNet, cache_root, write_cached
from ldmkit.vitals import metrics as vm

EMBED = 64
TEXT_WIDTH, TEXT_LENGTH = 64, 96
EPOCHS = 40
BATCH = 128
CANDIDATES = 32  # captions a sample's prompt is ranked among


def byte_tokens(texts: list[str]) -> torch.Tensor:
    """Tokens padded to the longest caption only (at most ``TEXT_LENGTH`` bytes): padding is
    masked, so this changes nothing but the cost."""
    longest = max((len(t.encode("utf-8")) for t in texts), default=1)
    return tokenize(texts, max(1, min(TEXT_LENGTH, longest)))


class ImageTextNet(nn.Module):
    """Images ``[N, C, H, W]`` in [-1, 1] and byte tokens ``[N, L]`` to unit vectors
    ``[N, EMBED]``; ``logit_scale`` is CLIP's learned inverse temperature (log, from 1/0.07)."""

    def __init__(self, channels: int):
        super().__init__()
        self.image = FeatureNet(channels, EMBED)
        self.text = ByteTextEncoder(TEXT_WIDTH, 2, TEXT_LENGTH)
        self.text_proj = nn.Linear(TEXT_WIDTH, EMBED)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def images(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image(x), dim=-1)

    def texts(self, tokens: torch.Tensor) -> torch.Tensor:
        encoded = self.text(len(tokens), tokens.device, tokens=tokens)
        return F.normalize(self.text_proj(encoded.context[:, 0]), dim=-1)


@dataclass
class ImageText:
    """The trained model, the dataset's distinct captions (retrieval's candidates), and its
    figures on held-out real images with their own captions: the ceiling of
    ``eval/clip_score`` and ``eval/prompt_retrieval``."""

    net: ImageTextNet
    captions: list[str]
    real_clip_score: float = 0.0
    real_retrieval: float = 0.0

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor, batch: int = 512) -> torch.Tensor:
        """Unit embeddings ``[N, EMBED]`` of uint8 images ``[N, C, H, W]``."""
        self.net.eval()
        return torch.cat([self.net.images(to_signed(x)) for x in images.split(batch)])

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        self.net.eval()
        return self.net.texts(byte_tokens(texts))

    def clip_score(self, images: torch.Tensor, prompts: list[str]) -> float:
        """Mean cosine of each image's and its prompt's embeddings (CLIP score without its
        x100 and clipping at 0)."""
        return (self.embed_images(images) * self.embed_texts(prompts)).sum(1).mean().item()

    def retrieval(self, images: torch.Tensor, prompts: list[str], seed: int = 0) -> float:
        """The share of images whose prompt ranks first among ``CANDIDATES`` captions: it and
        distinct others of the dataset, drawn once per prompt (fewer when the dataset has
        fewer; chance is one over their number)."""
        image_emb = self.embed_images(images)
        hits = torch.zeros(len(prompts), dtype=torch.bool)
        gen = torch.Generator().manual_seed(seed)
        for prompt in dict.fromkeys(prompts):
            others = [c for c in self.captions if c != prompt]
            pick = torch.randperm(len(others), generator=gen)[:CANDIDATES - 1].tolist()
            candidates = self.embed_texts([prompt] + [others[i] for i in pick])
            rows = torch.tensor([p == prompt for p in prompts])
            hits[rows] = (image_emb[rows] @ candidates.T).argmax(1) == 0
        return hits.float().mean().item()

    def metrics(self, images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
        """``eval/clip_score`` and ``eval/prompt_retrieval`` of samples of ``prompts``, with the
        real-image ceilings."""
        return {vm.EVAL_CLIP_SCORE: self.clip_score(images, prompts),
                vm.EVAL_PROMPT_RETRIEVAL: self.retrieval(images, prompts),
                vm.EVAL_CLIP_SCORE_REAL: self.real_clip_score,
                vm.EVAL_PROMPT_RETRIEVAL_REAL: self.real_retrieval}


def split_captioned(cfg: DataConfig) -> tuple[ImageData, ImageData]:
    """(images to train on, held-out images), with their captions; a fixed permutation."""
    data = load_data(dataclasses.replace(cfg, limit=None), captions=True)
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(1234))
    cut = int(0.8 * len(data))

    def pick(index: torch.Tensor) -> ImageData:
        return ImageData(data.images[index], None, data.source,
                         captions=[data.captions[i] for i in index.tolist()])

    return pick(perm[:cut]), pick(perm[cut:])


def train_image_text(train: ImageData, held_out: ImageData, seed: int = 0) -> ImageText:
    torch.manual_seed(seed)
    net = ImageTextNet(train.images.shape[1])
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=0.01)
    ids = {caption: i for i, caption in enumerate(dict.fromkeys(train.captions))}
    caption_id = torch.tensor([ids[c] for c in train.captions])
    tokens = byte_tokens(train.captions)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(EPOCHS):
        for idx in torch.randperm(len(train), generator=gen).split(BATCH):
            logits = net.logit_scale.exp().clamp(max=100) * \
                net.images(train.batch(idx)) @ net.texts(tokens[idx]).T
            same = (caption_id[idx, None] == caption_id[None, idx]).float()
            target = same / same.sum(1, keepdim=True)  # every image of a caption is its positive
            loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model = ImageText(net, list(dict.fromkeys(train.captions + held_out.captions)))
    model.real_clip_score = model.clip_score(held_out.images, held_out.captions)
    model.real_retrieval = model.retrieval(held_out.images, held_out.captions)
    return model


def _key(cfg: DataConfig) -> str:
    cfg = dataclasses.replace(cfg, limit=None)
    fields = {k: v for k, v in dataclasses.asdict(cfg).items()
              if k in ("source", "image_size", "channels", "caption_extension",
                       "caption_column", "missing_caption")}
    fields["data"] = source_digest(cfg, True)  # the files and their captions
    return "text-" + hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def load_or_train_image_text(cfg: DataConfig) -> ImageText:
    """The captioned dataset's model, cached; trained the first time (10 s for 512 captioned
    digits, 200 s for the 1636 emoji on this project's 2 cores). Inside a fork of torch's
    generator, as the classifier."""
    if cfg.source != "folder":
        raise DataError(f"eval/clip_score needs captions, which only a folder has (data.source "
                        f"is '{cfg.source}')")
    with torch.random.fork_rng(devices=[]):
        path = cache_root() / _key(cfg)
        try:
            meta = read_json(path / "meta.json")
            net = ImageTextNet(meta["channels"])
            net.load_state_dict(load_tensors(path / "weights.safetensors"))
            return ImageText(net, meta["captions"], meta["real_clip_score"],
                             meta["real_retrieval"])
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError):
            pass  # absent or damaged: trained again and rewritten
        train, held_out = split_captioned(cfg)
        print(f"eval: training the image-text model on {len(train)} captioned images "
              f"(cached in {path})")
        model = train_image_text(train, held_out)
        write_cached(path, model.net, {
            "channels": train.images.shape[1], "captions": model.captions,
            "real_clip_score": model.real_clip_score, "real_retrieval": model.real_retrieval,
            "data": dataclasses.asdict(cfg)}, "image_text_model")
        return model
