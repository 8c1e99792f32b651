"""Likelihood in bits per dimension for 8-bit images, and the uniform dequantisation it assumes."""

from __future__ import annotations

import math

import torch

# 8-bit data mapped to [-1, 1] has bins of width 2/256 = 1/128: P(bin) ≈ p(x) · 128^(−dims).
LOG_BIN_VOLUME_8BIT = math.log(128.0)
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def uniform_dequantize(images_uint8: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 images → float32 in [-1, 1): ``2 (k + u) / 256 − 1`` with u ~ U[0, 1) per value."""
    if images_uint8.dtype != torch.uint8:
        raise ValueError(f"uniform_dequantize expects uint8 images, got {images_uint8.dtype}")
    u = torch.rand(images_uint8.shape, generator=generator, device=images_uint8.device)
    return 2.0 * (images_uint8.float() + u) / 256.0 - 1.0


def bits_per_dim(z: torch.Tensor, logdets: torch.Tensor, var: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample bits/dim (B,), float64, for a TarFlow evaluated on uniformly dequantised 8-bit data.

    ``z`` (B, T, D) and ``logdets`` (B,, per-dimension) come from the model; ``var`` (T, D) is the prior
    variance (the model's ``var`` buffer: all ones for affine flows). Every dimension of z counts, so the
    result is right for any channel count."""
    z = z.double()
    if var is None:
        prior_nll = 0.5 * z.pow(2).mean(dim=(1, 2))
    else:
        var = var.double()
        prior_nll = 0.5 * (z.pow(2) / var).mean(dim=(1, 2)) + 0.5 * var.log().mean()
    nll_per_dim = prior_nll + _HALF_LOG_2PI + LOG_BIN_VOLUME_8BIT - logdets.double()
    return nll_per_dim / math.log(2.0)
