"""``ldmkit eval RUN``: sample quality of a trained run, logged as ``eval/*``.

Generates ``num`` images with the run's EMA weights and sampler, embeds them, held-out real
images and the training images with the dataset's classifier (``ldmkit.sampling.classifier``), and
computes the metrics of ``ldmkit.sampling.quality``. The values are appended to the run's
``metrics.jsonl`` at its last step, so ``ldmkit report`` shows them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ldmkit.conditioning.sources import ConditionSource
from ldmkit.config import Config, DataConfig, SampleConfig, check_flag, from_dict
from ldmkit.data.sources import load_data, to_signed
from ldmkit.errors import DataError, LdmkitError
from ldmkit.models.autoencoder import Autoencoder
from ldmkit.platform.distributed import SINGLE, Dist, broadcast_float
from ldmkit.platform.preemption import StopRequest
from ldmkit.run.layout import writing_run
from ldmkit.sampling.classifier import Classifier, load_or_train
from ldmkit.sampling.contrastive import ImageText, load_or_train_image_text
from ldmkit.sampling.generate import check_sampling, generate, guided_tags, run_source
from ldmkit.sampling.quality import (
    NotComputable,
    class_coverage,
    copy_distance,
    frechet_distance,
    memorization_rate,
    precision_recall,
)
from ldmkit.sampling.trained import load_for_sampling
from ldmkit.vitals import metrics as vm
from ldmkit.vitals.logs.metrics_jsonl import MetricLogger


@dataclass
class Reference:
    """The real images a run is judged against, embedded once: held-out images (FD,
    precision/recall) and the images the model trained on (memorization)."""

    clf: Classifier
    real: torch.Tensor  # [N, 128]
    train: torch.Tensor  # [M, 128]
    copy_distance: float | None  # memorization's threshold, from the training set alone
    skipped: dict[str, str] = field(default_factory=dict)  # tag: why it was not computed

    @classmethod
    def of(cls, clf: Classifier, real_images: torch.Tensor,
           train_images: torch.Tensor) -> Reference:
        """From uint8 images ``[N, C, H, W]``."""
        train = clf.embed(to_signed(train_images))[0]
        try:
            threshold = copy_distance(train)
        except NotComputable:
            threshold = None  # memorization_rate says why when it is asked for
        return cls(clf, clf.embed(to_signed(real_images))[0], train, threshold)

    def news(self, skipped: dict[str, str]) -> list[str]:
        """Reasons for skipped metrics not said before: a run says each once, not per eval."""
        new = {tag: why for tag, why in skipped.items() if self.skipped.get(tag) != why}
        self.skipped |= new
        return [f"eval: {', '.join(t for t in new if new[t] == why)} skipped: {why}"
                for why in dict.fromkeys(new.values())]


def quality_metrics(ref: Reference, fake_images: torch.Tensor,
                    labels: torch.Tensor | None = None,
                    skipped: dict[str, str] | None = None) -> dict[str, float]:
    """``eval/*`` of uint8 images ``[N, C, H, W]`` against the reference sets; with the class
    each image was asked for (a class-conditional model), ``eval/class_accuracy``: the share
    the classifier assigns to that class (chance: one over the number of classes). A metric
    the sets are too small for is left out, its reason put in ``skipped``."""
    fake, predicted = ref.clf.embed(to_signed(fake_images))
    measures = {
        (vm.EVAL_FD,): lambda: (frechet_distance(fake, ref.real),),
        (vm.EVAL_PRECISION, vm.EVAL_RECALL): lambda: precision_recall(ref.real, fake),
        (vm.EVAL_MEMORIZATION,): lambda: (memorization_rate(fake, ref.train,
                                                            threshold=ref.copy_distance),),
    }
    values = {vm.EVAL_CLASS_COVERAGE: class_coverage(predicted, ref.clf.classes),
              vm.EVAL_CLASSIFIER_ACCURACY: ref.clf.held_out_accuracy}
    for tags, measure in measures.items():
        try:
            values |= dict(zip(tags, measure(), strict=True))
        except NotComputable as exc:
            if skipped is not None:
                skipped |= dict.fromkeys(tags, str(exc))
    if labels is not None:
        values[vm.EVAL_CLASS_ACCURACY] = (predicted == labels).float().mean().item()
    return values


EVAL_NUM, EVAL_SAMPLER, EVAL_STEPS = 256, "dpmpp_2m", 20  # the in-loop budget
EVAL_MIN = 10  # fewer samples than this measure nothing


@dataclass
class InLoopEval:
    """``train.eval_every``: the ``eval/*`` metrics on a small budget during training (EVAL_NUM
    samples, DPM-Solver++(2M) with EVAL_STEPS steps), against references embedded once. The
    memorization reference is the images stage 2 trains on (the validation split excluded). A
    text-conditional run adds the image-text model's prompt adherence."""

    ref: Reference | None  # rank 0's; the other ranks only help sampling
    echo: Callable[[str], None] = print  # the loop's, which keeps its progress bar whole
    image_text: ImageText | None = None

    @classmethod
    def of(cls, data: DataConfig, train_index: torch.Tensor, d: Dist = SINGLE,
           echo: Callable[[str], None] = print, captioned: bool = False) -> InLoopEval | None:
        """None (rank 0 says why) when the dataset has neither labels for the classifier nor
        (``captioned``: a text-conditional run) captions for the image-text model."""
        ref = image_text = None
        if d.is_main:
            try:
                clf, _, held_out = load_or_train(data)
                trained_on = load_data(data).images[train_index]
                ref = Reference.of(clf, held_out.images[:EVAL_NUM * 4], trained_on)
            except DataError as exc:
                print(f"eval during training: {'only prompt adherence' if captioned else 'off'}"
                      f" ({exc})")
            image_text = load_or_train_image_text(data) if captioned else None
        if not broadcast_float(1.0 if ref is not None or image_text is not None else 0.0, d):
            return None
        return cls(ref, echo, image_text)

    def measure(self, model: torch.nn.Module, ae: Autoencoder, scale: float, cfg: Config,
                d: Dist = SINGLE, interrupt: Callable[[], bool] | None = None,
                source: ConditionSource | None = None) -> dict[str, float]:
        """Every rank samples its shard (``source``'s default request: every class, or the
        run's prompts, in turn); rank 0 gets the images and the metrics."""
        request = source.request(EVAL_NUM) if source is not None else None
        samples = generate(model, ae, scale, cfg, EVAL_NUM, EVAL_SAMPLER, EVAL_STEPS,
                           cfg.sample.seed + 1, d=d, interrupt=interrupt, request=request,
                           guidance=1.0)
        values: dict[str, float] = {}
        if self.ref is not None:
            skipped: dict[str, str] = {}
            values = quality_metrics(self.ref, samples.images, samples.labels, skipped)
            for line in self.ref.news(skipped):
                self.echo(line)
        if self.image_text is not None:
            values |= self.image_text.metrics(samples.images, samples.request.sample_names())
        return values


def reference(data: DataConfig, num: int, optional: bool) -> Reference | None:
    """The classifier's reference sets for ``ldmkit eval``; a dataset without labels is an
    error, or (``optional``: a text-conditional run, judged by the image-text model) leaves
    the classifier's metrics out, saying so."""
    try:
        clf, _, held_out = load_or_train(data)
    except DataError as exc:
        if not optional:
            raise
        print(f"eval: FD, precision, recall and memorization skipped ({exc})")
        return None
    trained_on = load_data(data)  # what the diffusion model saw: memorization's reference
    return Reference.of(clf, held_out.images[:num], trained_on.images)


def eval_run(run_dir: str | Path, num: int = 1000, sampler: str | None = None,
             steps: int | None = None, seed: int = 1,
             guidance: list[float] | None = None) -> dict[str, float]:
    """``ldmkit eval``: the metrics at the run's guidance scale, or at each of ``guidance``
    (a conditional model's fidelity/diversity sweep; each scale but 1 logged under
    ``TAG@cfgG``, with its sample vitals). A text-conditional run adds ``eval/clip_score``
    and ``eval/prompt_retrieval`` (sampling/contrastive.py)."""
    run_dir = Path(run_dir)
    if num < EVAL_MIN:
        raise LdmkitError(f"--num must be >= {EVAL_MIN} for the metrics to mean anything")
    num, steps, seed, _ = check_sampling(num, steps, seed)
    guidance = [check_flag(SampleConfig, "guidance_scale", g, "--guidance") for g in guidance or []]
    with writing_run(run_dir), StopRequest() as stop:
        cfg_dict, step, model, ae, scale, _ = load_for_sampling(run_dir)
        cfg = from_dict(cfg_dict)
        source = run_source(run_dir, model)
        conditional = source.kind != "none"
        scales = guidance or [cfg.sample.guidance_scale]
        if guidance and not conditional:
            raise LdmkitError("--guidance needs a conditional model (model.num_classes or "
                              f"model.text_encoder); the model of '{run_dir}' is unconditional: "
                              "drop --guidance")
        ref = reference(cfg.data, num, source.kind == "text")
        image_text = load_or_train_image_text(cfg.data) if source.kind == "text" else None
        s, values = cfg.sample, {}
        for g in scales:
            samples = generate(model, ae, scale, cfg, num, sampler or s.sampler,
                               steps or s.steps, seed, s.eta, interrupt=lambda: stop.requested,
                               request=source.request(num), guidance=g)
            skipped: dict[str, str] = {}
            measured = samples.vitals if len(scales) > 1 else {}
            if ref is not None:
                measured |= quality_metrics(ref, samples.images, samples.labels, skipped)
                for line in ref.news(skipped):
                    print(line)
            if image_text is not None:
                measured |= image_text.metrics(samples.images, samples.request.sample_names())
            values |= guided_tags(measured, g if conditional else 1.0)
        with MetricLogger(run_dir, tensorboard=cfg.tensorboard) as logger:
            logger.log(step, values)
    return values
