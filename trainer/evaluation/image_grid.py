"""Sample grids as PNG and sample arrays as .npz, written atomically (a crash or preemption mid-write never leaves
a truncated file where a previous good one was), with the permissions the user's umask gives a newly created file."""

from __future__ import annotations

import math
import os
import secrets
from pathlib import Path
from typing import IO, Callable

import numpy as np
import torch
from PIL import Image


def image_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 1) -> np.ndarray:
    """Images (N, C, H, W), float in [-1, 1], C = 1 or 3 → one uint8 array (H', W', 3), ``nrow`` images per row.

    Values are clipped to [-1, 1] and mapped to ``round((x + 1) * 127.5)`` (round half to even, as numpy and
    torch round); NaN becomes 0 (black), so a diverged sample is visible rather than an error. One channel is
    repeated into grey RGB. Cells are separated and framed by ``padding`` black pixels; ``nrow`` defaults to
    ceil(sqrt(N)), and unused cells of the last row stay black."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (N, 1 or 3, H, W), got {tuple(images.shape)}")
    n, _, h, w = images.shape
    if n == 0:
        raise ValueError("image_grid needs at least one image")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    ncol = nrow if nrow is not None else math.ceil(math.sqrt(n))
    if ncol < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    rows = math.ceil(n / ncol)

    # float64 on the CPU: exact for every input dtype (bf16 included) and independent of the device.
    x = images.detach().to("cpu", torch.float64).numpy()
    x = np.nan_to_num(x, nan=-1.0, posinf=1.0, neginf=-1.0)  # NaN → -1 → pixel 0
    pixels = np.rint((np.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    pixels = pixels.transpose(0, 2, 3, 1)  # (N, H, W, C)
    if pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=-1)

    grid = np.zeros((rows * (h + padding) + padding, ncol * (w + padding) + padding, 3), dtype=np.uint8)
    for i in range(n):
        top = padding + (i // ncol) * (h + padding)
        left = padding + (i % ncol) * (w + padding)
        grid[top:top + h, left:left + w] = pixels[i]
    return grid


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None, scale: int = 1,
                    padding: int = 1) -> Path:
    """Write ``image_grid(images, nrow, padding)`` as a PNG, upscaled ``scale``× by pixel repetition (nearest
    neighbour: 8×8 digits stay sharp and visible). Atomic: written to a temporary file then renamed."""
    return save_png(upscale(image_grid(images, nrow=nrow, padding=padding), scale), path)


def upscale(grid: np.ndarray, scale: int) -> np.ndarray:
    """Each pixel repeated ``scale``× along both axes (nearest neighbour)."""
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    return grid.repeat(scale, axis=0).repeat(scale, axis=1) if scale > 1 else grid


def save_png(grid: np.ndarray, path: str | os.PathLike) -> Path:
    """An (H, W, 3) uint8 array as an RGB PNG, written atomically."""
    image = Image.fromarray(grid)
    return _atomic_write(path, lambda f: image.save(f, format="PNG"))


def save_samples_npz(path: str | os.PathLike, **arrays: np.ndarray | torch.Tensor) -> Path:
    """``np.savez`` of the given arrays (tensors are moved to the CPU), written atomically."""
    converted = {k: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
                 for k, v in arrays.items()}
    # Writing through a file object keeps the exact name: np.savez would append ".npz" to a bare path.
    return _atomic_write(path, lambda f: np.savez(f, **converted))


def _atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], object]) -> Path:
    """Write via a temporary file in the destination's directory (same filesystem, so the rename is atomic).

    The temporary file is created by ``open(..., "xb")``, not ``tempfile.mkstemp``: mkstemp creates its files with
    mode 0600 whatever the umask, and the rename would carry that mode to the output, leaving sample grids and
    statistics unreadable by the group on a shared cluster. ``"x"`` refuses an existing name, as mkstemp does."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
