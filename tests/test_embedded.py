"""The embedded data sets and the fixed held-out split."""

import numpy as np
import pytest
from sklearn.datasets import load_digits

from data_pipeline.embedded import PHOTO_NAMES, load_embedded, split_heldout


def test_digits_are_sklearn_values_spread_to_uint8():
    data = load_embedded("digits")
    ref = load_digits()
    assert data.images.shape == (1797, 1, 8, 8) and data.images.dtype == np.uint8
    assert data.labels.dtype == np.int64 and np.array_equal(data.labels, ref.target)
    assert data.num_classes == 10 and data.name == "digits"
    # Every sklearn value v in 0..16 becomes round(v*255/16), exactly (8 -> 127.5 -> 128, half to even).
    table = {v: round(v * 255 / 16) for v in range(17)}
    assert table[0] == 0 and table[8] == 128 and table[16] == 255
    expected = np.vectorize(lambda v: table[int(v)])(ref.images).astype(np.uint8)
    assert np.array_equal(data.images[:, 0], expected)


def test_photos_shape_labels_and_content():
    data = load_embedded("photos")
    assert data.images.dtype == np.uint8 and data.images.shape[1:] == (3, 32, 32)
    assert data.num_classes == len(PHOTO_NAMES) == 7
    assert data.labels.dtype == np.int64 and data.labels.min() == 0 and data.labels.max() == data.num_classes - 1
    assert np.array_equal(np.bincount(data.labels), [64, 96, 96, 96, 72, 64, 88])
    assert len(data.images) == 576
    # Labels come in photo order, one contiguous run per photo.
    assert np.all(np.diff(data.labels) >= 0)
    # Real structure, no flat crops.
    assert data.images.reshape(len(data.images), -1).std(axis=1).min() > 5
    # The astronaut (square) is covered entirely by its 8x8 grid: its crops' mean colour is the photo's.
    from skimage.data import astronaut

    crops = data.images[data.labels == 0].astype(np.float64)
    assert np.allclose(crops.mean(axis=(0, 2, 3)), astronaut().reshape(-1, 3).mean(axis=0), atol=1.0)


def test_photos_deterministic_and_cached_read_only():
    cached = load_embedded("photos")
    assert load_embedded("photos") is cached
    fresh = load_embedded.__wrapped__("photos")  # bypass the cache: a rebuild gives identical bytes
    assert np.array_equal(fresh.images, cached.images) and np.array_equal(fresh.labels, cached.labels)
    with pytest.raises(ValueError):
        cached.images[0, 0, 0, 0] = 1


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"\['digits', 'photos'\]"):
        load_embedded("cifar")


def test_split_disjoint_complete_and_fixed():
    train, held = split_heldout(1797, 0.1, 0)
    assert len(held) == 180 and len(train) == 1617
    assert train.dtype == np.int64 and held.dtype == np.int64
    assert not set(train) & set(held)
    assert np.array_equal(np.sort(np.concatenate([train, held])), np.arange(1797))
    again_train, again_held = split_heldout(1797, 0.1, 0)
    assert np.array_equal(train, again_train) and np.array_equal(held, again_held)
    assert not np.array_equal(held, split_heldout(1797, 0.1, 1)[1])
    # Pinned: a legacy RandomState stream, so the split must never move between installs.
    assert split_heldout(10, 0.2, 0)[1].tolist() == [2, 8]


@pytest.mark.parametrize("n,fraction", [(100, 0.0), (100, 1.0), (100, -0.1), (100, 0.001), (3, 0.9), (1, 0.5)])
def test_split_rejects_empty_sides(n, fraction):
    with pytest.raises(ValueError, match="data.heldout_fraction"):
        split_heldout(n, fraction, 0)
