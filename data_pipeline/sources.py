"""Where images come from when writing shards: an embedded set, an image folder, or an .npz file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .embedded import EMBEDDED_NAMES, load_embedded, split_heldout
from .transforms import center_crop, resize_shorter_side

Sample = tuple[str, np.ndarray, int]  # key, uint8 (C, H, W), label
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


@dataclass
class Source:
    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    splits: dict[str, Callable[[], Iterator[Sample]]]  # "train", "heldout" → a fresh iterator of samples
    counts: dict[str, int]


def open_source(spec: str, *, image_size: int = 0, heldout_fraction: float = 0.1, seed: int = 0) -> Source:
    """``digits`` / ``photos`` (embedded), ``imagefolder:PATH`` (one sub-folder per class) or ``npz:PATH`` (arrays
    ``images`` uint8 (N, H, W, C) or (N, C, H, W) and optional ``labels``)."""
    if spec in EMBEDDED_NAMES:
        data = load_embedded(spec)
        return _from_arrays(spec, data.images, data.labels, data.num_classes, heldout_fraction, seed, image_size)
    kind, _, path = spec.partition(":")
    if kind == "npz" and path:
        return _from_npz(Path(path), heldout_fraction, seed, image_size)
    if kind == "imagefolder" and path:
        return _from_imagefolder(Path(path), heldout_fraction, seed, image_size)
    raise ValueError(f"unknown --source {spec!r}; use one of {list(EMBEDDED_NAMES)}, imagefolder:PATH or npz:PATH")


def _resized(image: np.ndarray, size: int) -> np.ndarray:
    """Shorter side to ``size``, then the centre square: the usual ImageNet-style preparation."""
    if not size or image.shape[1:] == (size, size):
        return image
    return np.ascontiguousarray(center_crop(resize_shorter_side(image, size), size))


def _from_arrays(name, images, labels, num_classes, fraction, seed, image_size) -> Source:
    train_idx, heldout_idx = split_heldout(len(images), fraction, seed)

    def samples(indices, split):
        def iterate():
            for i in indices:
                yield f"{split}-{int(i):08d}", _resized(np.ascontiguousarray(images[i]), image_size), int(labels[i])
        return iterate

    shape = _resized(np.ascontiguousarray(images[0]), image_size).shape
    return Source(name, num_classes, tuple(shape), {"train": samples(train_idx, "train"),
                                                    "heldout": samples(heldout_idx, "heldout")},
                  {"train": len(train_idx), "heldout": len(heldout_idx)})


def _from_npz(path: Path, fraction, seed, image_size) -> Source:
    if not path.is_file():
        raise ValueError(f"npz source {path} does not exist")
    with np.load(path) as data:
        if "images" not in data:
            raise ValueError(f"{path} has no 'images' array (found {sorted(data.files)})")
        images = data["images"]
        has_labels = "labels" in data
        labels = data["labels"] if has_labels else np.zeros(len(images), dtype=np.int64)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"{path}: 'images' must be uint8 (N, H, W, C) or (N, C, H, W), got {images.dtype} "
                         f"{images.shape}")
    if images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    num_classes = int(labels.max()) + 1 if has_labels else 0
    return _from_arrays(f"npz:{path}", images, labels.astype(np.int64), num_classes, fraction, seed, image_size)


def _from_imagefolder(root: Path, fraction, seed, image_size) -> Source:
    from PIL import Image

    if not root.is_dir():
        raise ValueError(f"imagefolder source {root} is not a directory")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"imagefolder source {root} has no class sub-folders")
    files = [(f, label) for label, c in enumerate(classes)
             for f in sorted((root / c).rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise ValueError(f"imagefolder source {root} has no images")
    if not image_size:
        raise ValueError("an imagefolder source needs --image-size (images are resized and centre-cropped to it)")
    train_idx, heldout_idx = split_heldout(len(files), fraction, seed)

    def load(i):
        path, label = files[i]
        try:
            with Image.open(path) as img:
                array = np.asarray(img.convert("RGB")).transpose(2, 0, 1)
        except Exception as e:
            raise ValueError(f"cannot read image {path}: {e}") from None
        return _resized(array, image_size), label

    def samples(indices, split):
        # Keys are indices: file names may hold dots, which webdataset reads as extensions.
        return lambda: ((f"{split}-{int(i):08d}", *load(int(i))) for i in indices)

    return Source(f"imagefolder:{root}", len(classes), (3, image_size, image_size),
                  {"train": samples(train_idx, "train"), "heldout": samples(heldout_idx, "heldout")},
                  {"train": len(train_idx), "heldout": len(heldout_idx)})
