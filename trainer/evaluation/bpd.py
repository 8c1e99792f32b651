"""Held-out bits/dim under uniform dequantisation, in fp32: one rank's share, and the collective over all ranks
(the training loop's evaluation, ``tarflow eval`` and FID sweeps all use ``collective_bits_per_dim``)."""

from __future__ import annotations

from typing import Iterable

import torch

from models import TarFlow, bits_per_dim

from ..distributed import all_reduce_sum
from ..noise import dequantize
from .sampler import evaluating


def heldout_loader(data_cfg, batch_size: int, rank: int = 0, world_size: int = 1):
    """This rank's share of the held-out split (every held-out image on exactly one rank)."""
    from data_pipeline import build_loader

    return build_loader(data_cfg, "heldout", batch_size, seed=0, rank=rank, world_size=world_size)


def heldout_bits_per_dim(model: TarFlow, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                         device: torch.device, *, max_images: int = 0, seed: int = 0) -> tuple[float, int]:
    """Mean bits/dim over the held-out images and how many were used.

    The dequantisation noise comes from its own generator, so evaluating is deterministic and leaves the training
    RNG untouched (an evaluated run and a resumed one stay identical). Class-conditional models are evaluated as
    p(x | y) with the true labels; unconditional ones as p(x). Returns the local sum's mean; over several ranks use
    ``collective_bits_per_dim``.
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    with evaluating(model):
        for x, y in batches:
            if max_images and count >= max_images:
                break
            if max_images:
                x, y = x[: max_images - count], y[: max_images - count]
            x = dequantize(x.to(device), generator)
            labels = y.to(device) if model.config.num_classes else None
            z, logdets = model(x, labels)
            total += bits_per_dim(z, logdets, model.var).sum()
            count += x.shape[0]
    if count == 0:
        raise ValueError("the held-out split is empty; raise data.heldout_fraction")
    return float(total) / count, count


def collective_bits_per_dim(model: TarFlow, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                            device: torch.device, *, max_images: int = 0,
                            world_size: int = 1) -> tuple[float, int]:
    """Collective: each rank evaluates its share (``batches``; ``max_images``, a total, split evenly over the
    ``world_size`` ranks), the sums are reduced; (mean bits/dim over all ranks' images, how many), on every rank."""
    limit = -(-max_images // world_size) if max_images else 0
    bpd, n = heldout_bits_per_dim(model, batches, device, max_images=limit)
    total, count = all_reduce_sum([bpd * n, float(n)], device)
    return total / count, int(count)
