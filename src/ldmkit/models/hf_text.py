"""Frozen pretrained text encoders from a local Hugging Face directory: CLIP and T5.

Stable Diffusion 1.x/2.x condition on a frozen CLIP text encoder's per-token states, SDXL adds
CLIP's pooled (projected) embedding to the time embedding, PixArt-alpha and SD3 use a frozen
T5 encoder (Rombach et al. 2022; Podell et al. 2023; Chen et al. 2023). Frozen, an encoder's
output for a caption never changes, so each distinct caption is encoded once, when the latent
cache is built (data/latents.py), and training never runs the encoder: it reads the cached
``EncodedCaptions``. Only prompts the cache lacks (``--prompt``) load the encoder again.

Nothing is downloaded: the model and its tokenizer load with ``local_files_only=True`` from
``model.text_encoder``, a directory holding ``config.json`` and the weights, and the tokenizer
either in it or beside it, as a diffusers pipeline lays them out (``text_encoder/`` and
``tokenizer/``, ``text_encoder_2/`` and ``tokenizer_2/``). ``transformers`` is the optional
extra ``ldmkit[text]``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from ldmkit.errors import ConfigError
from ldmkit.platform.files import open_regular, read_json

INSTALL = "pip install 'ldmkit[text]'"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model")


@dataclass(frozen=True)
class EncoderInfo:
    """What a backbone needs to know of a frozen encoder, read from its ``config.json``: its
    class, the width of its per-token states, of its pooled embedding (None: T5 has none),
    and the longest caption it takes (CLIP's position table; None: T5's relative positions)."""

    path: Path
    tokenizer: Path
    architecture: str
    context_dim: int
    pooled_dim: int | None
    max_positions: int | None


def _pooled_dim(architecture: str, config: dict) -> int | None:
    if architecture == "CLIPTextModelWithProjection":
        return config.get("projection_dim")  # text_embeds, SDXL's second encoder
    if architecture == "CLIPTextModel":
        return config.get("hidden_size")  # pooler_output: the end token's state
    return None


ARCHITECTURES = ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel")


def _tokenizer_dir(path: Path) -> Path | None:
    """The tokenizer beside the encoder: in its directory, or its pipeline sibling."""
    candidates = [path, path.parent / path.name.replace("text_encoder", "tokenizer")]
    for candidate in candidates:
        if any((candidate / name).is_file() for name in TOKENIZER_FILES):
            return candidate
    return None


def encoder_info(path: str | Path, max_length: int | None = None) -> EncoderInfo:
    """The encoder at ``path`` (``model.text_encoder``), checked without loading it: one-line
    ConfigErrors for a missing directory or config, an unsupported class, a missing tokenizer,
    a ``max_length`` (``model.text_max_length``) past its positions, or a missing
    ``transformers``."""
    path = Path(path)
    where = f"model.text_encoder '{path}'"
    if not path.is_dir():
        raise ConfigError(f"{where} is not a directory; set it to builtin or to a local Hugging "
                          "Face text encoder directory (config.json and weights)")
    try:
        config = read_json(path / "config.json")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{where} has no readable config.json ({exc.__class__.__name__}); "
                          "point it at a saved CLIPTextModel, CLIPTextModelWithProjection or "
                          "T5EncoderModel") from None
    architecture = next(iter(config.get("architectures") or [None]), None) \
        if isinstance(config, dict) else None
    if architecture not in ARCHITECTURES:
        raise ConfigError(f"{where} holds a {str(architecture)[:60]}, not a text encoder ldmkit "
                          f"takes ({', '.join(ARCHITECTURES)})")
    if not any(path.glob("*.safetensors")):
        raise ConfigError(f"{where} has no .safetensors weights (ldmkit never unpickles a "
                          ".bin); save it with save_pretrained(dir, safe_serialization=True)")
    tokenizer = _tokenizer_dir(path)
    if tokenizer is None:
        raise ConfigError(f"{where} has no tokenizer in it or in a sibling 'tokenizer' "
                          "directory; save the tokenizer with the encoder (save_pretrained)")
    if importlib.util.find_spec("transformers") is None:
        raise ConfigError(f"{where} is a Hugging Face encoder, which needs transformers: "
                          f"{INSTALL}")
    width = config.get("d_model") if architecture == "T5EncoderModel" else config.get("hidden_size")
    positions = config.get("max_position_embeddings") if architecture != "T5EncoderModel" else None
    if max_length is not None and positions is not None and max_length > positions:
        raise ConfigError(f"model.text_max_length {max_length} is longer than the "
                          f"{positions} tokens {where} takes; set model.text_max_length: "
                          f"{positions}")
    return EncoderInfo(path, tokenizer, architecture, int(width),
                       _pooled_dim(architecture, config), positions)


def encoder_digest(info: EncoderInfo) -> str:
    """SHA-256 over the encoder's and tokenizer's files: the cached embeddings' key. A start
    asks for it twice (the preflight's cache check, then the cache itself); the files are
    read once per process while their names, sizes and times stay the same."""
    files = tuple(
        (path, stat.st_size, stat.st_mtime_ns)
        for folder in dict.fromkeys((info.path, info.tokenizer))
        for path in sorted(p for p in folder.iterdir() if p.is_file()
                           and p.suffix in (".json", ".safetensors", ".model", ".txt"))
        for stat in (path.stat(),))
    return _digest(files)


@functools.lru_cache(maxsize=8)
def _digest(files: tuple[tuple[Path, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for path, _, _ in files:
        digest.update(path.name.encode())
        with open_regular(path) as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


@dataclass
class EncodedCaptions:
    """Distinct captions and their frozen encoding: ``context [U, L, D]`` and ``mask [U, L]``
    (bool, the tokenizer's attention mask) and ``pooled [U, P]`` (None without one), in the
    encoder's dtype."""

    captions: list[str]
    context: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor | None

    def index(self, texts: list[str]) -> torch.Tensor:
        """``[N]`` rows of ``texts`` (KeyError for one not encoded)."""
        where = {caption: row for row, caption in enumerate(self.captions)}
        return torch.tensor([where[text] for text in texts], dtype=torch.int64)

    def joined(self, other: EncodedCaptions) -> EncodedCaptions:
        pooled = None if self.pooled is None else torch.cat([self.pooled, other.pooled])
        return EncodedCaptions(self.captions + other.captions,
                               torch.cat([self.context, other.context]),
                               torch.cat([self.mask, other.mask]), pooled)

    def tensors(self) -> dict[str, torch.Tensor]:
        """For a safetensors file (``from_tensors`` reads it back)."""
        return {"context": self.context.contiguous(), "mask": self.mask.to(torch.uint8),
                **({"pooled": self.pooled.contiguous()} if self.pooled is not None else {})}

    @classmethod
    def from_tensors(cls, captions: list[str], tensors: dict[str, torch.Tensor]
                     ) -> EncodedCaptions | None:
        """None when the tensors do not fit ``captions`` (a damaged cache is rebuilt)."""
        context, mask, pooled = tensors.get("context"), tensors.get("mask"), tensors.get("pooled")
        if context is None or mask is None or context.ndim != 3 or len(context) != len(captions) \
                or tuple(mask.shape) != tuple(context.shape[:2]) \
                or (pooled is not None and len(pooled) != len(captions)):
            return None
        return cls(captions, context, mask.bool(), pooled)


class FrozenTextEncoder:
    """A pretrained encoder and its tokenizer, loaded once, frozen, in their own dtype."""

    def __init__(self, info: EncoderInfo, max_length: int):
        import transformers

        self.info, self.max_length = info, max_length
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(
            info.tokenizer, local_files_only=True)
        model_class = getattr(transformers, info.architecture)
        self.model = model_class.from_pretrained(info.path, local_files_only=True, dtype="auto",
                                                 use_safetensors=True).eval().requires_grad_(False)

    @torch.no_grad()
    def encode(self, texts: list[str], batch: int = 64) -> EncodedCaptions:
        """``texts`` padded (or cut) to ``max_length`` tokens, encoded ``batch`` at a time."""
        contexts, masks, pooled = [], [], []
        for start in range(0, len(texts), batch):
            tokens = self.tokenizer(texts[start:start + batch], padding="max_length",
                                    max_length=self.max_length, truncation=True,
                                    return_tensors="pt")
            out = self.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
            contexts.append(out.last_hidden_state)
            masks.append(tokens.attention_mask.bool())
            extra = getattr(out, "text_embeds", None)
            extra = getattr(out, "pooler_output", None) if extra is None else extra
            if self.info.pooled_dim is not None:
                pooled.append(extra)
        return EncodedCaptions(list(texts), torch.cat(contexts), torch.cat(masks),
                               torch.cat(pooled) if pooled else None)
