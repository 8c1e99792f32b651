"""Held-out bits/dim under uniform dequantisation, in fp32."""

from __future__ import annotations

from typing import Iterable

import torch

from models import TarFlow, bits_per_dim

from .noise import dequantize


@torch.no_grad()
def heldout_bits_per_dim(model: TarFlow, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                         device: torch.device, *, max_images: int = 0, seed: int = 0) -> tuple[float, int]:
    """Mean bits/dim over the held-out images and how many were used.

    The dequantisation noise comes from its own generator, so evaluating is deterministic and leaves the training
    RNG untouched (an evaluated run and a resumed one stay identical). Class-conditional models are evaluated as
    p(x | y) with the true labels; unconditional ones as p(x). Returns the local sum's mean; data-parallel callers
    reduce ``(sum, count)`` themselves.
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
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
    model.train(was_training)
    if count == 0:
        raise ValueError("the held-out split is empty; raise data.heldout_fraction")
    return float(total) / count, count
