"""The sampling trajectory (the paper's figure): the image after each inverted flow block, as a grid.

``model.reverse(..., return_sequence=True)`` gives N + 1 images per sample: the starting noise (times √var,
unpatchified) and the state after each block, in the order the blocks are inverted (block N−1 first, block 0
last; the last state is the sample). With ``denoise_std`` the denoised sample is one more column. The grid has one
row per sample and one column per state, in that order; values are clipped to [-1, 1] for display (the noise
column is N(0, 1) noise, so it saturates), NaN shows black. ``trajectory.npz`` holds the unclipped array
``trajectory`` (B, K, C, H, W), the column names and the labels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from models import TarFlow

from ..runtime import Precision
from .image_grid import save_image_grid, save_samples_npz
from .sampler import SamplingSettings, draw


def column_names(num_blocks: int, denoised: bool = False) -> list[str]:
    names = ["noise"] + [f"block {i} inverted" for i in reversed(range(num_blocks))]
    return names + ["denoised"] if denoised else names


def sampling_trajectory(model: TarFlow, noise: torch.Tensor, labels: torch.Tensor | None,
                        settings: SamplingSettings = SamplingSettings(), *, device: torch.device | str = "cpu",
                        precision: Precision = Precision(None)) -> tuple[torch.Tensor, list[str]]:
    """(trajectory (B, K, C, H, W) float32 on the CPU, the K column names); K = num_blocks + 1 (+ 1 denoised)."""
    drawn = draw(model, noise, labels, settings, device=torch.device(device), precision=precision, sequence=True)
    states = drawn.states if drawn.denoised is None else [*drawn.states, drawn.denoised]
    trajectory = torch.stack([s.cpu() for s in states], dim=1)
    return trajectory, column_names(model.config.num_blocks, drawn.denoised is not None)


def save_trajectory(trajectory: torch.Tensor, names: list[str], out_dir: str | Path,
                    labels: torch.Tensor | None = None, prefix: str = "") -> tuple[Path, Path]:
    """``trajectory.png`` (rows: samples, columns: states) and ``trajectory.npz``; returns both paths."""
    if trajectory.dim() != 5 or trajectory.shape[1] != len(names):
        raise ValueError(f"expected a trajectory (B, {len(names)}, C, H, W), got {tuple(trajectory.shape)}")
    out_dir = Path(out_dir)
    b, k, c, h, w = trajectory.shape
    scale = max(1, 64 // h)  # 8×8 digits become visible
    png = save_image_grid(trajectory.reshape(b * k, c, h, w), out_dir / f"{prefix}trajectory.png", nrow=k,
                          scale=scale)
    arrays = {"trajectory": trajectory, "columns": np.array(names)}
    if labels is not None:
        arrays["labels"] = labels
    npz = save_samples_npz(out_dir / f"{prefix}trajectory.npz", **arrays)
    return png, npz
