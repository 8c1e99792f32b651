"""Real image sets that install with the package's dependencies: no download, no network.

- ``digits``: scikit-learn's 1,797 handwritten digits, 1×8×8, 10 classes.
- ``photos``: 576 RGB 32×32 crops of seven colour photographs bundled in the scikit-image wheel, label = photo.

Both are small enough to hold in memory; they exist so that training, evaluation and resumption can be tested on
real pixels anywhere.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class EmbeddedImages:
    """An in-memory labelled image set. Arrays are read-only because ``load_embedded`` shares them (cached)."""

    images: np.ndarray  # uint8 (N, C, H, W)
    labels: np.ndarray  # int64 (N,)
    num_classes: int
    name: str


def _digits() -> EmbeddedImages:
    # The file that sklearn.datasets.load_digits reads, read the way it reads it (np.loadtxt; 64 pixels then the
    # label per row), found without importing sklearn: its import (scipy.stats and more) costs every training
    # process seconds, and every process of a launch loads the embedded set. tests/test_embedded.py compares with
    # load_digits itself.
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise ImportError("the embedded digits come with scikit-learn: pip install scikit-learn")
    table = np.loadtxt(Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz", delimiter=",")
    # sklearn stores integer intensities 0..16 as float64; spread them over 0..255 (np.rint: half to even,
    # which only matters for 8 -> 127.5 -> 128).
    values = np.rint(table[:, :-1].reshape(-1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)
    return EmbeddedImages(values[:, None], table[:, -1].astype(np.int64), 10, "digits")


# Colour photographs from skimage.data that load offline (those needing pooch are excluded). Not used: the grey
# ones (camera, moon, ...: skipped rather than replicated to 3 channels, since grey would be a trivial class cue),
# ``cat`` (the same picture as ``chelsea``), ``retina`` (its black corners give near-constant crops), and the
# synthetic ``colorwheel`` / ``logo``. The order fixes the labels: do not reorder, only append.
_PHOTOS: tuple[tuple[str, Callable[[], np.ndarray]], ...] = (
    ("astronaut", lambda: _skimage_data().astronaut()),
    ("chelsea", lambda: _skimage_data().chelsea()),
    ("coffee", lambda: _skimage_data().coffee()),
    ("rocket", lambda: _skimage_data().rocket()),
    ("hubble_deep_field", lambda: _skimage_data().hubble_deep_field()),
    ("immunohistochemistry", lambda: _skimage_data().immunohistochemistry()),
    ("motorcycle_left", lambda: _skimage_data().stereo_motorcycle()[0]),
)
PHOTO_NAMES: tuple[str, ...] = tuple(name for name, _ in _PHOTOS)
_SHORT_SIDE = 256  # a 32-px crop then shows a recognisable part (an eye, a cup rim), not texture or a thumbnail
_CROP = 32


def _skimage_data():
    import skimage.data

    return skimage.data


def _grid_crops(photo: np.ndarray) -> np.ndarray:
    """Downscale so the shorter side is 256 px, then cut a centred grid of non-overlapping 32×32 crops.

    Returns uint8 (n, 3, 32, 32) in row-major grid order.
    """
    from skimage.transform import resize

    h, w = photo.shape[:2]
    scale = _SHORT_SIDE / min(h, w)
    out_h, out_w = round(h * scale), round(w * scale)
    small = resize(photo, (out_h, out_w), order=1, anti_aliasing=True, preserve_range=True)
    small = np.clip(np.rint(small), 0, 255).astype(np.uint8)
    rows, cols = out_h // _CROP, out_w // _CROP
    top, left = (out_h - rows * _CROP) // 2, (out_w - cols * _CROP) // 2
    grid = small[top:top + rows * _CROP, left:left + cols * _CROP]
    # (rows*32, cols*32, 3) -> (rows, 32, cols, 32, 3) -> (rows, cols, 3, 32, 32)
    crops = grid.reshape(rows, _CROP, cols, _CROP, 3).transpose(0, 2, 4, 1, 3)
    return np.ascontiguousarray(crops.reshape(rows * cols, 3, _CROP, _CROP))


def _photos() -> EmbeddedImages:
    crops, labels = [], []
    for label, (_, load) in enumerate(_PHOTOS):
        c = _grid_crops(load())
        crops.append(c)
        labels.append(np.full(len(c), label, dtype=np.int64))
    return EmbeddedImages(np.concatenate(crops), np.concatenate(labels), len(_PHOTOS), "photos")


_SETS: dict[str, Callable[[], EmbeddedImages]] = {"digits": _digits, "photos": _photos}
EMBEDDED_NAMES: tuple[str, ...] = tuple(_SETS)


@functools.lru_cache(maxsize=None)
def load_embedded(name: str) -> EmbeddedImages:
    """Load an embedded set by name (cached per process: ``photos`` takes about a second to build)."""
    if name not in _SETS:
        raise ValueError(f"unknown embedded data set {name!r}; choose one of {list(EMBEDDED_NAMES)}")
    data = _SETS[name]()
    data.images.flags.writeable = False
    data.labels.flags.writeable = False
    return data


def split_heldout(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(n)`` into (train, held-out) index arrays, each sorted, int64.

    The held-out part is the first ``round(n * fraction)`` entries of a permutation drawn from
    ``np.random.RandomState(seed)``: the legacy generator, whose stream NumPy keeps frozen across versions, so a
    split stays the same on any install.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"data.heldout_fraction must be in (0, 1), got {fraction}")
    n_heldout = round(n * fraction)
    if n_heldout < 1 or n_heldout > n - 1:
        raise ValueError(
            f"data.heldout_fraction={fraction} of {n} samples leaves {n_heldout} held out and {n - n_heldout} for "
            "training; both need at least 1"
        )
    if not 0 <= seed < 2**32:
        raise ValueError(f"data.split_seed must be in [0, 2**32), got {seed}")
    perm = np.random.RandomState(seed).permutation(n).astype(np.int64)
    return np.sort(perm[n_heldout:]), np.sort(perm[:n_heldout])
