"""Sample grids of fixed noise (training-time grids, ``tarflow sample``): with and without guidance, before and after
the denoising step, as PNG grids and one .npz."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from models import TarFlow

from ..config import SampleConfig
from ..runtime import Precision
from .image_grid import save_image_grid, save_samples_npz
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


def save_grids(result: SampleResult, out_dir: Path, prefix: str, labels: torch.Tensor | None) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, images in result.images.items():
        path = out_dir / f"{prefix}{name}.png"
        scale = max(1, 64 // images.shape[-1])  # 8×8 digits become visible
        save_image_grid(images, path, scale=scale)
        paths.append(path)
    arrays = {k: v.numpy() for k, v in result.images.items()}
    if labels is not None:
        arrays["labels"] = labels.numpy()
    save_samples_npz(out_dir / f"{prefix}samples.npz", **arrays)
    return paths
