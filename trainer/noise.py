"""Training-time corruption of images, done on the device: Gaussian noise or uniform dequantisation; label drop."""

from __future__ import annotations

import torch

# Images arrive normalised as k/255·2 − 1 (k the 8-bit value), as the reference's transforms produce them.


def to_8bit(x: torch.Tensor) -> torch.Tensor:
    """Recover the integer pixel value k from a normalised image."""
    return torch.round((x + 1) * 127.5)


def dequantize(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """2(k + u)/256 − 1 with u ~ U[0, 1): the bins of width 1/128 in [-1, 1] that bits/dim is defined on."""
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32)
    return 2.0 * (to_8bit(x) + u) / 256.0 - 1.0


def corrupt(x: torch.Tensor, kind: str, noise_std: float) -> torch.Tensor:
    if kind == "uniform":
        return dequantize(x)
    if kind == "gaussian":
        return x + noise_std * torch.randn_like(x)
    raise ValueError(f"unknown noise kind {kind!r}")


def drop_labels(y: torch.Tensor, probability: float) -> torch.Tensor:
    """Replace each label by −1 (the model's "no label": mean class embedding) with the given probability."""
    if probability <= 0:
        return y
    return torch.where(torch.rand(y.shape, device=y.device) < probability, torch.full_like(y, -1), y)


def denoise_std(kind: str, noise_std: float) -> float:
    """σ of the training corruption, for the Tweedie step: uniform noise over a 1/128 bin has std (1/128)/√12."""
    return noise_std if kind == "gaussian" else (1.0 / 128.0) / 12 ** 0.5
