"""What every loader yields: images, labels and each sample's index in its split."""

from __future__ import annotations

from typing import NamedTuple

import torch


class Batch(NamedTuple):
    """One rank's batch. ``indices`` (int64, (B,)) number the samples of the split 0..N-1 in the split's natural
    order (the manifest's shard order, or the embedded split's order): a sample has the same index whatever the
    ranks, workers, micro-batch or epoch. Per-sample randomness (dequantisation, label drop) is keyed by it, so
    a sample gets the same draw on any launch."""

    images: torch.Tensor   # float32 (B, C, H, W) in [-1, 1]
    labels: torch.Tensor   # int64 (B,)
    indices: torch.Tensor  # int64 (B,)
