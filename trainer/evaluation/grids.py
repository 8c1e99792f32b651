"""Sample grids of fixed noise (training-time grids, ``tarflow sample``): with and without guidance, before and after
the denoising step, as PNG grids and one .npz."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from models import TarFlow

from ..config import SampleConfig
from ..runtime import Precision
from .image_grid import image_grid, save_png, save_samples_npz, upscale
from .sampler import SamplingSettings, finite_rows, inversion_settings, sample_on_ranks


@dataclass
class SampleResult:
    images: dict[str, torch.Tensor]  # name → (N, C, H, W) in [-1, 1]
    passes: dict[str, list[int]] = field(default_factory=dict)  # g<guidance> → passes per block, last block first

    @property
    def nonfinite(self) -> dict[str, int]:
        """name → samples with a NaN/Inf value."""
        return {k: int((~finite_rows(v)).sum()) for k, v in self.images.items()}


def guidance_settings(guidances: list[float], base: SamplingSettings) -> list[SamplingSettings]:
    """``base`` at each guidance weight, duplicates removed (grids are named by their guidance)."""
    return [replace(base, guidance=g) for g in dict.fromkeys(guidances)]


def grid_settings(cfg: SampleConfig, denoise_std: float | None) -> list[SamplingSettings]:
    """The training-time grids: without guidance, and with ``sample.guidance`` when it is set."""
    base = SamplingSettings(attn_temp=cfg.attn_temp, annealed=cfg.annealed, denoise_std=denoise_std,
                            inversion=inversion_settings(cfg.method, cfg.tol, cfg.max_iters, cfg.window))
    return guidance_settings([0.0, cfg.guidance] if cfg.guidance > 0 else [0.0], base)


def sample_grids(model: TarFlow, noise: torch.Tensor, labels: torch.Tensor | None, settings: list[SamplingSettings],
                 *, device: torch.device, precision: Precision, rank: int = 0,
                 world_size: int = 1) -> SampleResult | None:
    """Collective (``sample_on_ranks``): on rank 0 the images ``g<guidance>`` per setting and, when it denoises,
    ``g<guidance>_denoised``, on the CPU; None on the other ranks."""
    drawn = sample_on_ranks(model, noise, labels, settings, device=device, precision=precision, rank=rank,
                            world_size=world_size)
    if drawn is None:
        return None
    result = SampleResult({})
    for s, d in zip(settings, drawn):
        result.images[f"g{s.guidance:g}"] = d.sample
        result.passes[f"g{s.guidance:g}"] = d.passes
        if d.denoised is not None:
            result.images[f"g{s.guidance:g}_denoised"] = d.denoised
    return result


def grid_pictures(result: SampleResult) -> dict[str, np.ndarray]:
    """name → the (H, W, 3) uint8 grid of its images, as ``save_grids`` writes it and the loggers show it."""
    # Small images are upscaled by pixel repetition to at least 64 pixels: 8×8 digits become visible.
    return {name: upscale(image_grid(images), max(1, 64 // images.shape[-1]))
            for name, images in result.images.items()}


def save_grids(result: SampleResult, out_dir: Path, prefix: str, labels: torch.Tensor | None,
               pictures: dict[str, np.ndarray] | None = None) -> list[Path]:
    """``<prefix><name>.png`` per grid (``pictures``: ``grid_pictures(result)`` when already made) and
    ``<prefix>samples.npz`` with every image and the labels."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pictures = grid_pictures(result) if pictures is None else pictures
    paths = [save_png(grid, out_dir / f"{prefix}{name}.png") for name, grid in pictures.items()]
    arrays = {k: v.numpy() for k, v in result.images.items()}
    if labels is not None:
        arrays["labels"] = labels.numpy()
    save_samples_npz(out_dir / f"{prefix}samples.npz", **arrays)
    return paths
