"""Sample grids: with and without guidance, before and after the denoising step."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from models import TarFlow

from .config import SampleConfig
from .image_grid import save_image_grid, save_samples_npz
from .runtime import Precision


@dataclass
class SampleResult:
    images: dict[str, torch.Tensor]  # name → (N, C, H, W) in [-1, 1]

    @property
    def nonfinite(self) -> dict[str, int]:
        """name → samples with a NaN/Inf value."""
        return {k: int((~torch.isfinite(v).flatten(1).all(1)).sum()) for k, v in self.images.items()}


def fixed_noise_and_labels(model: TarFlow, num: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Drawn on the CPU from ``seed``, so the same seed gives the same samples on any device."""
    c = model.config
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(num, c.num_patches, c.patch_dim, generator=generator)
    labels = torch.arange(num) % c.num_classes if c.num_classes else None
    return noise, labels


def generate(model: TarFlow, noise: torch.Tensor, labels: torch.Tensor | None, *, guidances: list[float],
             attn_temp: float, annealed: bool, denoise_std: float | None, device: torch.device,
             precision: Precision) -> SampleResult:
    was_training = model.training
    model.eval()
    noise = noise.to(device)
    labels = labels.to(device) if labels is not None else None
    images: dict[str, torch.Tensor] = {}
    for g in dict.fromkeys(guidances):
        with precision.autocast(device):
            x = model.reverse(noise, labels, guidance=g, attn_temp=attn_temp, annealed_guidance=annealed)
        x = x.float()
        images[f"g{g:g}"] = x.cpu()
        if denoise_std is not None:
            finite = torch.isfinite(x).flatten(1).all(1)
            clean = x.clone()
            if finite.any():  # one non-finite sample must not poison the others' denoising
                clean[finite] = model.denoise(x[finite], labels[finite] if labels is not None else None,
                                              noise_std=denoise_std)
            images[f"g{g:g}_denoised"] = clean.cpu()
    model.train(was_training)
    return SampleResult(images)


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


def sample_config_guidances(cfg: SampleConfig) -> list[float]:
    return [0.0, cfg.guidance] if cfg.guidance > 0 else [0.0]
