"""``ldmkit eval RUN``: sample quality of a trained run, logged as ``eval/*``.

Generates ``num`` images with the run's EMA weights and sampler, embeds them, held-out real
images and the training images with the dataset's classifier (``ldmkit.classifier``), and
computes the metrics of ``ldmkit.quality``. The values are appended to the run's
``metrics.jsonl`` at its last step, so ``ldmkit report`` shows them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ldmkit.classifier import Classifier, load_or_train
from ldmkit.config import from_dict
from ldmkit.data import load_data, to_signed
from ldmkit.logging import MetricLogger
from ldmkit.quality import class_coverage, frechet_distance, memorization_rate, precision_recall
from ldmkit.resume import load_for_sampling
from ldmkit.sample import generate


def quality_metrics(clf: Classifier, fake_images: torch.Tensor, real_images: torch.Tensor,
                    train_images: torch.Tensor) -> dict[str, float]:
    """``eval/*`` of uint8 images ``[N, C, H, W]`` against held-out real and training images."""
    fake, predicted = clf.embed(to_signed(fake_images))
    real, _ = clf.embed(to_signed(real_images))
    train, _ = clf.embed(to_signed(train_images))
    precision, recall = precision_recall(real, fake)
    return {"eval/fd": frechet_distance(fake, real), "eval/precision": precision,
            "eval/recall": recall, "eval/class_coverage": class_coverage(predicted, clf.classes),
            "eval/memorization": memorization_rate(fake, train),
            "eval/classifier_accuracy": clf.held_out_accuracy}


def eval_run(run_dir: str | Path, num: int = 1000, sampler: str | None = None,
             steps: int | None = None, seed: int = 1) -> dict[str, float]:
    run_dir = Path(run_dir)
    cfg_dict, step, model, ae, scale = load_for_sampling(run_dir)
    cfg = from_dict(cfg_dict)
    clf, _, held_out = load_or_train(cfg.data)
    trained_on = load_data(cfg.data)  # what the diffusion model saw: memorization's reference
    s = cfg.sample
    samples = generate(model, ae, scale, cfg, num, sampler or s.sampler, steps or s.steps, seed,
                       s.eta)
    real = held_out.images[:num]
    values = quality_metrics(clf, samples.images, real, trained_on.images)
    with MetricLogger(run_dir, tensorboard=cfg.tensorboard) as logger:
        logger.log(step, values)
    return values
