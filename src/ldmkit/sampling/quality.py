"""Sample-quality metrics on feature vectors: pure functions, no model, no download.

Features come from a classifier trained in-project on the dataset's labels
(``ldmkit.sampling.classifier``), in the role Inception plays for FID on natural images.

- Frechet distance (Heusel et al. 2017) between Gaussians fitted to two feature sets.
- Precision and recall (Kynkaanniemi et al. 2019): the share of generated samples inside the
  real data's k-NN manifold, and of real samples inside the generated one.
- Class coverage: ``exp(entropy of predicted classes) / classes``, the effective number of
  classes generated as a share of all (1 when balanced, ``1/classes`` when one class only).
- Memorization rate (in the spirit of Somepalli et al. 2023): the share of samples whose nearest
  training image is closer than all but ``quantile`` of training images are to their own nearest
  other training image, i.e. closer than distinct training images ever are: copies.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ldmkit.errors import DataError

CHUNK = 1024


class NotComputable(DataError):
    """A metric these sets are too small for (a few images per class, one class): it is
    skipped with this reason, never a crash and never a made-up value."""


def _need(count: int, least: int, what: str, metric: str) -> None:
    if count < least:
        raise NotComputable(f"{metric} needs at least {least} {what}, there are {count}")


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2))`` of features ``[N, D]`` (float64)."""
    _need(min(len(a), len(b)), 2, "samples and real images", "the Frechet distance")
    x, y = a.double().numpy(), b.double().numpy()
    mu_x, mu_y = x.mean(0), y.mean(0)
    cov_x, cov_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    # tr (C_x C_y)^(1/2) = tr (S C_y S)^(1/2) with S = C_x^(1/2): symmetric, so eigvalsh is
    # exact and stable even when a set collapses to a point (singular covariance)
    w, v = np.linalg.eigh(cov_x)
    root_x = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_x @ cov_y @ root_x), 0, None)).sum()
    fd = ((mu_x - mu_y) ** 2).sum() + np.trace(cov_x) + np.trace(cov_y) - 2 * cross
    return float(max(fd, 0.0))


def _min_distances(a: torch.Tensor, b: torch.Tensor, exclude_self: bool = False) -> torch.Tensor:
    """For each row of ``a``, the distance to its nearest row of ``b`` ``[N]``, in chunks."""
    out = []
    for start in range(0, len(a), CHUNK):
        d = torch.cdist(a[start:start + CHUNK].float(), b.float())
        if exclude_self:
            idx = torch.arange(start, min(start + CHUNK, len(a)))
            d[idx - start, idx] = float("inf")
        out.append(d.min(1).values)
    return torch.cat(out)


def _kth_radius(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance of each row of ``x`` to its k-th nearest other row ``[N]``."""
    out = []
    for start in range(0, len(x), CHUNK):
        d = torch.cdist(x[start:start + CHUNK].float(), x.float())
        out.append(d.kthvalue(k + 1, dim=1).values)  # the 1st is the row itself (0)
    return torch.cat(out)


def _inside(points: torch.Tensor, centers: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    hits = []
    for start in range(0, len(points), CHUNK):
        d = torch.cdist(points[start:start + CHUNK].float(), centers.float())
        hits.append((d <= radii[None]).any(1))
    return torch.cat(hits)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """A set's manifold is its points' balls out to their k-th nearest neighbour, so each set
    needs more than ``k`` points."""
    _need(min(len(real), len(fake)), k + 1, "samples and real images", "precision/recall")
    real_r, fake_r = _kth_radius(real, k), _kth_radius(fake, k)
    precision = _inside(fake, real, real_r).float().mean().item()
    recall = _inside(real, fake, fake_r).float().mean().item()
    return precision, recall


def class_coverage(predicted: torch.Tensor, classes: int) -> float:
    counts = torch.bincount(predicted, minlength=classes).double()
    p = counts[counts > 0] / counts.sum()
    entropy = -(p * p.log()).sum().item()
    return math.exp(entropy) / classes


def copy_distance(train: torch.Tensor, quantile: float = 0.05) -> float:
    """The ``quantile`` of train-to-nearest-other-train distances: nearer than this is a copy.

    It depends on the training set only, so it is computed once per set (``evaluate.Reference``).
    """
    _need(len(train), 2, "training images", "memorization")
    return torch.quantile(_min_distances(train, train, exclude_self=True), quantile).item()


def memorization_rate(fake: torch.Tensor, train: torch.Tensor, quantile: float = 0.05,
                      threshold: float | None = None) -> float:
    """Share of ``fake`` within ``threshold`` (default ``copy_distance(train, quantile)``) of
    a training feature."""
    threshold = copy_distance(train, quantile) if threshold is None else threshold
    return (_min_distances(fake, train) <= threshold).float().mean().item()
