"""Where a model's condition comes from: nothing, a class, or a caption.

One source per run, chosen by the config (``model.num_classes``, ``model.text_encoder``). It
gives a training batch's condition rows (from the encoded dataset, which stores the labels or
captions beside the latents), the null condition that ``train.cond_drop_prob`` and
classifier-free guidance need, and what sampling asks for (``--class``, ``--prompt``; by
default every class, or the run's prompts, in turn) with the group of each sample, by which the
per-class or per-prompt diversity is measured. Nothing else asks whether a model is
conditional: a backbone declares the keys it takes (``condition_keys``), and the loop, the
sampler, validation and evaluation go through the source.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ldmkit.config import Config
from ldmkit.data.stage1 import LatentPosteriors
from ldmkit.diffusion import condition
from ldmkit.diffusion.condition import CONTEXT, CONTEXT_MASK, LABELS, POOLED, TOKENS, Cond
from ldmkit.errors import LdmkitError
from ldmkit.models.hf_text import EncodedCaptions, FrozenTextEncoder, encoder_info
from ldmkit.models.text import tokenize
from ldmkit.platform.files import read_file

PROMPT_COLUMNS = 8  # prompts of a text-conditional run's grid during training


@dataclass(frozen=True)
class Request:
    """What sampling asks for: one condition row per sample (``{}``: unconditional), the group
    of each sample (its class or prompt; None when there is none) with the groups' names, and
    the grid's columns."""

    cond: Cond
    groups: torch.Tensor | None = None  # [N] int64
    names: list[str] | None = None
    columns: int | None = None
    by: str = "class"  # what a group is: "class" or "prompt" (vitals/metrics.py's tags)

    def __len__(self) -> int:
        return len(next(iter(self.cond.values()))) if self.cond else 0

    def sample_names(self) -> list[str]:
        """The name of each sample's group (its prompt, or class name)."""
        return [self.names[g] for g in self.groups.tolist()]


class ConditionSource:
    """No condition: the unconditional model's source, and the others' base."""

    kind = "none"

    def rows(self, index: torch.Tensor) -> Cond:
        """The condition of the dataset's rows ``index``."""
        return {}

    def null(self, cond: Cond) -> Cond:
        return condition.null(cond)

    def request(self, num: int) -> Request:
        """What sampling asks for by default: ``num`` samples, every group in turn."""
        return Request({})

    def attach(self, model: torch.nn.Module) -> None:
        """Give a freshly built backbone what it needs of the source (a frozen encoder's
        empty caption); nothing for the others."""


@dataclass
class ClassSource(ConditionSource):
    """Class labels (``model.num_classes``): every class in turn, one per grid column."""

    num_classes: int
    labels: torch.Tensor | None = None  # [N] of the dataset
    classes: list[str] | None = None
    kind = "class"

    def rows(self, index: torch.Tensor) -> Cond:
        if self.labels is None:
            return {}
        return {LABELS: self.labels[index]}

    def request(self, num: int, choice: str | None = None) -> Request:
        """``--class``: None (every class in turn), ``all`` (one grid row per class, ``num //
        num_classes`` samples each), a class index or a class folder's name; a one-line error
        for a class the model does not have."""
        labels, columns = requested_labels(choice, num, self.num_classes, self.classes)
        return Request({LABELS: labels}, labels, self.classes, columns)


@dataclass
class TextSource(ConditionSource):
    """Captions (``model.text_encoder: builtin``) as byte tokens: the dataset's, and the
    prompts asked for (by default the run's ``prompts``, one per grid column)."""

    max_length: int
    captions: list[str] | None = None  # of the dataset, row by row
    prompts: list[str] | None = None
    kind = "text"

    def __post_init__(self) -> None:
        self.tokens = None if self.captions is None else tokenize(self.captions, self.max_length)

    def rows(self, index: torch.Tensor) -> Cond:
        if self.tokens is None:
            raise LdmkitError("this text-conditional run has no captions to train on; "
                              "rebuild its latent cache (`ldmkit encode RUN`)")
        return {TOKENS: self.tokens[index]}

    def encode(self, texts: list[str]) -> Cond:
        """The condition rows of ``texts``."""
        return {TOKENS: tokenize(texts, self.max_length)}

    def request(self, num: int, prompts: list[str] | None = None, per_prompt: int | None = None
                ) -> Request:
        """``prompts`` with ``per_prompt`` samples each, a grid row per prompt; by default the
        run's prompts in turn, ``num`` samples, a grid column per prompt."""
        if prompts:
            per = per_prompt or max(1, num // len(prompts))
            groups = torch.arange(len(prompts)).repeat_interleave(per)
            return Request(condition.rows(self.encode(list(prompts)), groups), groups,
                           list(prompts), per, "prompt")
        names = self.prompts or [""]
        groups = torch.arange(num) % len(names)
        return Request(condition.rows(self.encode(names), groups), groups, names, len(names),
                       "prompt")


@dataclass
class EncodedTextSource(TextSource):
    """Captions through a frozen pretrained encoder (``model.text_encoder``: a directory;
    models/hf_text.py): rows are the latent cache's encodings of the dataset's captions, so
    training never runs the encoder; a prompt the cache lacks loads it once. The null
    condition is ``condition.null``'s all-False mask, which the backbone reads as the encoded
    empty caption that ``attach`` gives it."""

    encoder: str = ""
    encoded: EncodedCaptions | None = None  # the cache's, the empty caption among them

    def __post_init__(self) -> None:
        self.info = encoder_info(self.encoder, self.max_length)
        self.index = None if self.captions is None or self.encoded is None \
            else self.encoded.index(self.captions)
        self._loaded: FrozenTextEncoder | None = None

    def rows(self, index: torch.Tensor) -> Cond:
        if self.index is None:
            raise LdmkitError("this text-conditional run has no encoded captions to train on; "
                              "rebuild its latent cache (`ldmkit encode RUN`)")
        return self._cond(self.encoded, self.index[index])

    def encode(self, texts: list[str]) -> Cond:
        known = set(self.encoded.captions) if self.encoded is not None else set()
        missing = [text for text in dict.fromkeys(texts) if text not in known]
        if missing:
            if self._loaded is None:
                self._loaded = FrozenTextEncoder(self.info, self.max_length)
            new = self._loaded.encode(missing)
            self.encoded = new if self.encoded is None else self.encoded.joined(new)
        return self._cond(self.encoded, self.encoded.index(texts))

    @staticmethod
    def _cond(encoded: EncodedCaptions, index: torch.Tensor) -> Cond:
        cond = {CONTEXT: encoded.context[index].float(), CONTEXT_MASK: encoded.mask[index]}
        return cond if encoded.pooled is None else {**cond, POOLED: encoded.pooled[index].float()}

    def attach(self, model: torch.nn.Module) -> None:
        empty = self.encode([""])
        model.text.set_null(empty[CONTEXT][0], empty[CONTEXT_MASK][0],
                            empty[POOLED][0] if POOLED in empty else None)


def requested_labels(choice: str | None, num: int, num_classes: int | None,
                     classes: list[str] | None = None) -> tuple[torch.Tensor | None, int | None]:
    """``--class`` -> (labels, grid columns); see ``ClassSource.request``."""
    if choice is None:
        return (torch.arange(num) % num_classes, num_classes) if num_classes else (None, None)
    if not num_classes:
        raise LdmkitError(f"--class {choice[:40]}: this run's model is not class-conditional "
                          "(model.num_classes is null); sample without --class")
    if choice == "all":
        per = max(1, num // num_classes)
        return torch.arange(num_classes).repeat_interleave(per), per
    names = classes or []
    index = names.index(choice) if choice in names else (
        int(choice) if choice.lstrip("-").isdigit() else None)
    if index is None or not 0 <= index < num_classes:
        known = f"0-{num_classes - 1}" + (f" or one of {', '.join(names)[:200]}" if names else "")
        raise LdmkitError(f"--class {choice[:40]} is not a class of this model ({known}); "
                          "pass one of those, or all")
    return torch.full((num,), index), None


def read_prompts(path: str | Path) -> list[str]:
    """``--prompts FILE``: one prompt per non-empty line of a UTF-8 file; a one-line error for
    a missing, unreadable, non-UTF-8 or empty file."""
    try:
        text = read_file(Path(path)).decode("utf-8")
    except UnicodeDecodeError:
        raise LdmkitError(f"--prompts '{path}' is not UTF-8 text; save it as UTF-8") from None
    except OSError as exc:
        raise LdmkitError(f"--prompts '{path}' cannot be read ({exc.strerror or exc}); pass a "
                          "text file with one prompt per line") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise LdmkitError(f"--prompts '{path}' holds no prompt; write one per line")
    return prompts


def training_prompts(configured: list[str], captions: list[str], train_rows: torch.Tensor
                     ) -> list[str]:
    """The prompts of a text-conditional run's grids: ``sample.prompts``, then distinct
    captions of training images spread evenly over the dataset, ``PROMPT_COLUMNS`` in all
    (fixed for the run's life, so its grids are comparable)."""
    prompts = list(dict.fromkeys(configured))
    picks = torch.linspace(0, len(train_rows) - 1, 4 * PROMPT_COLUMNS).long().tolist()
    for row in (int(train_rows[i]) for i in picks):
        if len(prompts) >= max(PROMPT_COLUMNS, len(configured)):
            break
        if captions[row] and captions[row] not in prompts:
            prompts.append(captions[row])
    return prompts


def source_of(cfg: Config, latents: LatentPosteriors | None = None,
              classes: list[str] | None = None, prompts: list[str] | None = None
              ) -> ConditionSource:
    """The source of the run ``cfg`` describes: with ``latents``, able to give training rows;
    ``classes`` and ``prompts``: the run's class names and grid prompts (RunDir)."""
    model = cfg.model
    if model.num_classes:
        return ClassSource(model.num_classes, latents.labels if latents else None,
                           classes or (latents.classes if latents else None))
    captions = latents.captions if latents else None
    if model.text_encoder == "builtin":
        return TextSource(model.text_max_length, captions, prompts)
    if model.text_encoder:
        return EncodedTextSource(model.text_max_length, captions, prompts, model.text_encoder,
                                 latents.encoded if latents else None)
    return ConditionSource()


def source_of_model(model: torch.nn.Module, classes: list[str] | None = None,
                    prompts: list[str] | None = None) -> ConditionSource:
    """The source of a trained model, by the keys it takes: a checkpoint, not the config,
    decides what the network was built with."""
    keys = getattr(model, "condition_keys", ())
    if LABELS in keys:
        return ClassSource(model.num_classes, None, classes)
    if TOKENS in keys:
        return TextSource(model.text.max_length, None, prompts)
    if CONTEXT in keys:
        return EncodedTextSource(model.text.max_length, None, prompts, model.text.encoder)
    return ConditionSource()
