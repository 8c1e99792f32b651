"""Per-sample transforms run in loader workers: resize, centre crop, random flip, uint8 → float in [-1, 1]."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .seeding import derive_seed


def resize_shorter_side(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 (C, H, W): shorter side to ``size`` (bicubic), aspect ratio kept."""
    from PIL import Image

    c, h, w = image.shape
    if min(h, w) == size:
        return image
    scale = size / min(h, w)
    pil = Image.fromarray(image[0] if c == 1 else image.transpose(1, 2, 0))
    pil = pil.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    out = np.asarray(pil)
    return out[None] if out.ndim == 2 else out.transpose(2, 0, 1)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    _, h, w = image.shape
    if size > min(h, w):
        raise ValueError(f"cannot centre-crop {size}×{size} from an image of {h}×{w}; lower data.crop")
    top, left = (h - size) // 2, (w - size) // 2
    return image[:, top:top + size, left:left + size]


def to_float(image: np.ndarray) -> torch.Tensor:
    """k/255·2 − 1, as the reference's ToTensor + Normalize(0.5, 0.5); k is recovered by rounding (x+1)·127.5.

    The same three float32 operations as ``torch``'s ``.float().div(255).mul(2).sub(1)`` (so bit-identical), done
    in place in numpy: per-sample torch calls cost several times more in loader workers."""
    x = image.astype(np.float32)
    x /= np.float32(255)
    x *= np.float32(2)
    x -= np.float32(1)
    return torch.from_numpy(x)


def flip_decision(seed: int, epoch: int, key: str) -> bool:
    """Whether a sample is flipped in an epoch: a hash of (seed, epoch, key), so it does not depend on which rank
    or worker reads the sample, nor on whether the run was resumed."""
    return bool(derive_seed("flip", seed, epoch, key) & 1)


@dataclass(frozen=True)
class ImageTransform:
    resize: int = 0
    crop: int = 0
    random_flip: bool = False

    def output_shape(self, stored: tuple[int, int, int]) -> tuple[int, int, int]:
        c, h, w = stored
        if self.resize:
            scale = self.resize / min(h, w)
            h, w = max(self.resize, round(h * scale)), max(self.resize, round(w * scale))
        if self.crop:
            h = w = self.crop
        return c, h, w

    def __call__(self, image: np.ndarray, *, seed: int, epoch: int, key: str) -> torch.Tensor:
        if self.resize:
            image = resize_shorter_side(image, self.resize)
        if self.crop:
            image = center_crop(image, self.crop)
        if self.random_flip and flip_decision(seed, epoch, key):
            image = image[:, :, ::-1]
        return to_float(image)
