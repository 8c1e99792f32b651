"""Training-time corruption of images, done on the device: Gaussian noise or uniform dequantisation; label drop.

Every draw is per sample, from a generator seeded by (purpose, seed, step, the sample's index in its split), never
from a per-rank stream: a sample gets the same noise and the same label drop at a step whichever rank, micro-batch
or number of ranks it lands on, so a run's trajectory does not depend on its launch (up to floating-point
summation order). The generators are the device's own (CPU and CUDA streams differ: the same launch-independence
holds per device type).
"""

from __future__ import annotations

import torch

from data_pipeline.seeding import derive_seed

# Images arrive normalised as k/255·2 − 1 (k the 8-bit value), as the reference's transforms produce them.


def to_8bit(x: torch.Tensor) -> torch.Tensor:
    """Recover the integer pixel value k from a normalised image."""
    return torch.round((x + 1) * 127.5)


def sample_generators(purpose: str, seed: int, step: int, indices: torch.Tensor,
                      device: torch.device) -> list[torch.Generator]:
    """One generator per sample, seeded by (purpose, seed, step, index); ``step`` is the optimizer step the draw
    belongs to (evaluation uses a fixed one). A generator per sample costs one small kernel per sample and draw
    (on a GPU, a few microseconds each): far below a TarFlow step's forward and backward."""
    return [torch.Generator(device=device).manual_seed(derive_seed(purpose, seed, step, int(i)))
            for i in indices.tolist()]


def _per_sample(draw, generators: list[torch.Generator], shape: torch.Size, device: torch.device) -> torch.Tensor:
    return torch.stack([draw(shape, generator=g, device=device, dtype=torch.float32) for g in generators])


def dequantize(x: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """2(k + u)/256 − 1 with u ~ U[0, 1) per sample: the bins of width 1/128 in [-1, 1] that bits/dim is defined on."""
    u = _per_sample(torch.rand, generators, x.shape[1:], x.device)
    return 2.0 * (to_8bit(x) + u) / 256.0 - 1.0


def corrupt(x: torch.Tensor, kind: str, noise_std: float, generators: list[torch.Generator]) -> torch.Tensor:
    """The training corruption of a batch, one generator per sample (``sample_generators("noise", ...)``)."""
    if kind == "uniform":
        return dequantize(x, generators)
    if kind == "gaussian":
        return x + noise_std * _per_sample(torch.randn, generators, x.shape[1:], x.device).to(x.dtype)
    raise ValueError(f"unknown noise kind {kind!r}")


def drop_labels(y: torch.Tensor, probability: float, generators: list[torch.Generator]) -> torch.Tensor:
    """Replace each label by −1 (the model's "no label": mean class embedding) with the given probability, one draw
    per sample (``sample_generators("label_drop", ...)``, a stream of its own: the noise does not move with it)."""
    if probability <= 0:
        return y
    u = _per_sample(torch.rand, generators, torch.Size(), y.device)
    return torch.where(u < probability, torch.full_like(y, -1), y)


def denoise_std(kind: str, noise_std: float) -> float:
    """σ of the training corruption, for the Tweedie step: uniform noise over a 1/128 bin has std (1/128)/√12."""
    return noise_std if kind == "gaussian" else (1.0 / 128.0) / 12 ** 0.5
