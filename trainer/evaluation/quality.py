"""Offline sample-quality metrics in the feature space of a data set's classifier (``classifier``): what can be
measured without the FID Inception weights. Against the classifier's held-out split (stored in its file):

- **class accuracy**: the fraction of class-conditional samples the classifier assigns to the label they were drawn
  for (None for an unconditional model);
- **classifier FD**: the Fréchet distance (``fid.frechet_distance``, the FID formula) between Gaussians fitted to
  the penultimate features of the samples and of the held-out images ("digits-FD");
- **precision / recall** (Kynkäänniemi et al. 2019, k = 3): each set's manifold is the union of balls around its
  points with the radius of the distance to the k-th nearest other point of the set; precision is the fraction of
  samples inside the held-out manifold, recall the fraction of held-out images inside the samples' manifold. Recall
  depends on how many samples span the manifold, so it is computed against consecutive groups of as many samples as
  there are held-out images (by global index; the last, incomplete group is left out) and averaged: the number does
  not drift with the sample count. Precision uses every sample.

``baseline``: the held-out split's own accuracy (the ceiling of the class accuracy) and, between its two halves
(even / odd positions), the FD (the floor of the FD at that sample size: the FD has a positive bias that shrinks
with the number of images) and precision / recall.

Across ranks (``QualityScorer``): each rank classifies its own samples and only (index, features, prediction,
label) travel to rank 0, which orders them by global index: the numbers do not depend on the number of ranks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..distributed import gather_objects
from .classifier import Classifier, predict
from .fid import FeatureAccumulator, FeatureStats

K = 3
_CHUNK = 2048  # rows per distance block


# ---------------------------------------------------------------- the metrics
def class_accuracy(predictions: torch.Tensor, labels: torch.Tensor | None) -> float | None:
    if labels is None or len(labels) == 0:
        return None
    return float((predictions == labels).double().mean())


def feature_stats(features: torch.Tensor) -> FeatureStats:
    acc = FeatureAccumulator(features.shape[1])
    acc.update(features)
    return FeatureStats.from_accumulator(acc, {"network": "classifier"})


def feature_fd(a: torch.Tensor, b: torch.Tensor) -> float:
    """The Fréchet distance between Gaussians fitted to the features ``a`` and ``b`` (float64)."""
    return feature_stats(a).fid(feature_stats(b))


def _kth_radius(x: torch.Tensor, k: int) -> torch.Tensor:
    """(N,): the distance of each point to its k-th nearest other point of ``x``."""
    if len(x) <= k:
        raise ValueError(f"precision/recall with k={k} need more than {k} points in each set, got {len(x)}")
    return torch.cat([torch.cdist(x[i:i + _CHUNK], x).topk(k + 1, largest=False).values[:, k]
                      for i in range(0, len(x), _CHUNK)])


def _covered(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """(N,) bool: each point lies in at least one ball (centre, radius)."""
    return torch.cat([(torch.cdist(points[i:i + _CHUNK], centres) <= radii[None]).any(1)
                      for i in range(0, len(points), _CHUNK)])


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = K) -> tuple[float, float]:
    """k-NN precision and recall of the ``fake`` features against the ``real`` ones (see the module doc)."""
    real, fake = real.double(), fake.double()
    precision = float(_covered(fake, real, _kth_radius(real, k)).double().mean())
    group = min(len(real), len(fake))
    recalls = [float(_covered(real, g, _kth_radius(g, k)).double().mean())
               for g in fake[: len(fake) // group * group].split(group)]
    return precision, sum(recalls) / len(recalls)


@dataclass
class QualityResult:
    num_samples: int
    class_accuracy: float | None
    classifier_fd: float
    precision: float
    recall: float

    def row(self) -> dict:
        return asdict(self)


def quality_of(clf: Classifier, features: torch.Tensor, predictions: torch.Tensor,
               labels: torch.Tensor | None) -> QualityResult:
    """The metrics of samples (their features, predicted labels and the labels they were drawn for) against the
    classifier's held-out split."""
    precision, recall = precision_recall(clf.heldout_features, features)
    return QualityResult(len(features), class_accuracy(predictions, labels),
                         feature_fd(features, clf.heldout_features), precision, recall)


def baseline(clf: Classifier) -> dict:
    """The held-out split's own accuracy (ceiling), and FD, precision and recall between its halves (floor)."""
    f = clf.heldout_features
    a, b = f[0::2], f[1::2]
    precision, recall = precision_recall(b, a)
    return {"heldout_images": len(f), "heldout_accuracy": class_accuracy(clf.heldout_predictions,
                                                                         clf.heldout_labels),
            "halves_fd": feature_fd(a, b), "halves_precision": precision, "halves_recall": recall}


# ---------------------------------------------------------------- across ranks
class QualityScorer:
    """One setting's samples: ``update`` with each batch on every rank, then the collective ``finish``."""

    def __init__(self, clf: Classifier, device: torch.device) -> None:
        self.clf, self.device = clf, device
        self.parts: list[tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor | None]] = []

    def update(self, indices: list[int], labels: torch.Tensor | None, pixels_uint8: torch.Tensor) -> None:
        features, predictions = predict(self.clf.net, pixels_uint8, device=self.device)
        self.parts.append((list(indices), features, predictions, None if labels is None else labels.cpu()))

    def finish(self, rank: int = 0) -> QualityResult | None:
        """Collective: every rank's samples to rank 0, which gets the metrics (the other ranks None)."""
        everything = [p for parts in gather_objects(self.parts) for p in parts]
        self.parts = []
        if rank != 0:
            return None
        indices = torch.tensor([i for p in everything for i in p[0]], dtype=torch.int64)
        order = torch.argsort(indices)
        features = torch.cat([p[1] for p in everything])[order]
        predictions = torch.cat([p[2] for p in everything])[order]
        labelled = all(p[3] is not None for p in everything)
        labels = torch.cat([p[3] for p in everything])[order] if labelled and everything else None
        return quality_of(self.clf, features, predictions, labels)
