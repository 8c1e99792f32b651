"""Held-out bits/dim under uniform dequantisation, in fp32: one rank's share, and the collective over all ranks
(the training loop's evaluation, ``tarflow eval`` and FID sweeps all use ``collective_bits_per_dim``)."""

from __future__ import annotations

import torch

from models import TarFlow, bits_per_dim

from ..distributed import all_reduce_sum
from ..noise import dequantize, sample_generators
from .sampler import evaluating


def heldout_loader(data_cfg, batch_size: int, rank: int = 0, world_size: int = 1):
    """This rank's share of the held-out split (every held-out image on exactly one rank)."""
    from data_pipeline import build_loader

    return build_loader(data_cfg, "heldout", batch_size, seed=0, rank=rank, world_size=world_size)


def heldout_bits_per_dim(model: TarFlow, loader, device: torch.device, *, max_images: int = 0,
                         seed: int = 0) -> tuple[float, int]:
    """Mean bits/dim over this rank's held-out images and how many were used.

    ``loader`` yields ``Batch``es (images, labels, indices) and is rewound first, so every evaluation reads the
    same images. ``max_images`` keeps the images of index < max_images (the first ones of the split), and each
    image's dequantisation noise is keyed by (seed, its index): the images and the noise do not depend on the
    number of ranks, and evaluating leaves the training RNG untouched. Class-conditional models are evaluated as
    p(x | y) with the true labels; unconditional ones as p(x). Over several ranks use ``collective_bits_per_dim``.
    """
    if hasattr(loader, "rewind"):
        loader.rewind()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    with evaluating(model):
        for x, y, indices in loader:
            if max_images:
                keep = indices < max_images
                if not bool(keep.any()):
                    if getattr(loader, "index_ordered", False):
                        break  # every later image of this rank has a larger index
                    continue
                x, y, indices = x[keep], y[keep], indices[keep]
            x = dequantize(x.to(device), sample_generators("heldout", seed, 0, indices, device))
            labels = y.to(device) if model.config.num_classes else None
            z, logdets = model(x, labels)
            total += bits_per_dim(z, logdets, model.var).sum()
            count += x.shape[0]
    return float(total) / max(count, 1), count


def collective_bits_per_dim(model: TarFlow, loader, device: torch.device, *, max_images: int = 0,
                            world_size: int = 1) -> tuple[float, int]:
    """Collective: each rank evaluates its share (``loader``), the sums are reduced; (mean bits/dim over all
    ranks' images, how many), on every rank. ``max_images``: the images of index < max_images, whatever the ranks."""
    bpd, n = heldout_bits_per_dim(model, loader, device, max_images=max_images)
    total, count = all_reduce_sum([bpd * n, float(n)], device)
    if count == 0:
        raise ValueError("the held-out split is empty; raise data.heldout_fraction")
    return total / count, int(count)
