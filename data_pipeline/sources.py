"""Where images come from when writing shards: an embedded set, an image folder, or an .npz file.

Every source resizes the way the official TarFlow code prepares ImageNet: torchvision's ``Resize(size)`` then
``CenterCrop(size)`` on a PIL image (``resize_center_crop``; tests/test_sources.py checks it against torchvision).
A source reads any sample by its position in its split (``Source.sample_at``), so that worker processes can each
prepare a different stretch of a split and a resumed or partial write can start anywhere.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from .embedded import EMBEDDED_NAMES, load_embedded, split_heldout

Sample = tuple[str, np.ndarray, int]  # key, uint8 (C, H, W), label
# torchvision's ImageFolder: its file suffixes, and its order of files (below)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class Source:
    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    splits: dict[str, Callable[[], Iterator[Sample]]]  # "train", "heldout" → a fresh iterator of samples
    counts: dict[str, int]
    # (split, position) → the sample at that position of the split's order; None for a source that can only be
    # iterated (then a writer skips to a position by iterating, and loads samples in one process).
    sample_at: Callable[[str, int], Sample] | None = None
    # What the source was opened with; a resumed or partial write must have been started with the same.
    settings: dict[str, Any] = field(default_factory=dict)

    def samples(self, split: str, start: int, stop: int) -> Iterator[Sample]:
        """The samples at positions ``start`` to ``stop`` (exclusive) of a split, in order."""
        if self.sample_at is not None:
            return (self.sample_at(split, i) for i in range(start, stop))
        return itertools.islice(self.splits[split](), start, stop)


def source_settings(spec: str, *, image_size: int = 0, heldout_fraction: float = 0.1, seed: int = 0) -> dict:
    """What ``open_source`` records in ``Source.settings``: a write's parts and resumptions compare it."""
    return {"spec": spec, "image_size": int(image_size), "heldout_fraction": float(heldout_fraction),
            "split_seed": int(seed)}


def open_source(spec: str, *, image_size: int = 0, heldout_fraction: float = 0.1, seed: int = 0) -> Source:
    """``digits`` / ``photos`` (embedded), ``imagefolder:PATH`` (one sub-folder per class) or ``npz:PATH`` (arrays
    ``images`` uint8 (N, H, W, C) or (N, C, H, W) and optional ``labels``)."""
    settings = source_settings(spec, image_size=image_size, heldout_fraction=heldout_fraction, seed=seed)
    if spec in EMBEDDED_NAMES:
        data = load_embedded(spec)
        source = _from_arrays(spec, data.images, data.labels, data.num_classes, heldout_fraction, seed, image_size)
    else:
        kind, _, path = spec.partition(":")
        if kind == "npz" and path:
            source = _from_npz(Path(path), heldout_fraction, seed, image_size)
        elif kind == "imagefolder" and path:
            source = _from_imagefolder(Path(path), heldout_fraction, seed, image_size)
        else:
            raise ValueError(f"unknown --source {spec!r}; use one of {list(EMBEDDED_NAMES)}, imagefolder:PATH or "
                             f"npz:PATH")
    source.settings = settings
    return source


def resize_center_crop(image, size: int):
    """A PIL image → ``size``×``size``, as torchvision's ``Resize(size)`` + ``CenterCrop(size)`` do on PIL images:
    the shorter side to ``size`` and the longer to ``int(size * long / short)`` (bilinear, which PIL antialiases),
    unless the image has that size already; then the crop at ``round((side - size) / 2)``."""
    from PIL import Image

    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.BILINEAR)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def _array_of(image) -> np.ndarray:
    """PIL image → uint8 (C, H, W)."""
    array = np.asarray(image)
    return np.ascontiguousarray(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))


def _resized(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 (C, H, W) → (C, size, size) through ``resize_center_crop``; unchanged when ``size`` is 0."""
    from PIL import Image

    if not size or image.shape[1:] == (size, size):  # what torchvision does with an image of that size already
        return image
    return _array_of(resize_center_crop(Image.fromarray(image[0] if image.shape[0] == 1 else
                                                        image.transpose(1, 2, 0)), size))


def _from_arrays(name, images, labels, num_classes, fraction, seed, image_size) -> Source:
    indices = dict(zip(("train", "heldout"), split_heldout(len(images), fraction, seed)))

    def sample_at(split: str, position: int) -> Sample:
        i = int(indices[split][position])
        return f"{split}-{i:08d}", _resized(np.ascontiguousarray(images[i]), image_size), int(labels[i])

    shape = _resized(np.ascontiguousarray(images[0]), image_size).shape
    return _indexed_source(name, num_classes, tuple(shape), {s: len(idx) for s, idx in indices.items()}, sample_at)


def _indexed_source(name, num_classes, image_shape, counts, sample_at) -> Source:
    def iterate(split):
        return lambda: (sample_at(split, i) for i in range(counts[split]))

    return Source(name, num_classes, image_shape, {split: iterate(split) for split in counts}, counts, sample_at)


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
    files = [(Path(directory, name), label) for label, c in enumerate(classes)
             for directory, _, names in sorted(os.walk(root / c, followlinks=True))
             for name in sorted(names) if name.lower().endswith(IMAGE_SUFFIXES)]
    if not files:
        raise ValueError(f"imagefolder source {root} has no images")
    if not image_size:
        raise ValueError("an imagefolder source needs --image-size (images are resized and centre-cropped to it)")
    indices = dict(zip(("train", "heldout"), split_heldout(len(files), fraction, seed)))

    def sample_at(split: str, position: int) -> Sample:
        i = int(indices[split][position])  # sample i is torchvision's ImageFolder(root)[i]
        path, label = files[i]
        try:
            with Image.open(path) as img:  # RGB as torchvision's ImageFolder loader converts it
                array = _array_of(resize_center_crop(img.convert("RGB"), image_size))
        except Exception as e:  # PIL raises several types for unreadable files
            raise ValueError(f"cannot read image {path}: {type(e).__name__}: {e}; remove or replace the "
                             f"file") from None
        # Keys are indices: file names may hold dots, which webdataset reads as extensions.
        return f"{split}-{i:08d}", array, label

    return _indexed_source(f"imagefolder:{root}", len(classes), (3, image_size, image_size),
                           {s: len(idx) for s, idx in indices.items()}, sample_at)
