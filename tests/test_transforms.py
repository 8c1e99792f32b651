import numpy as np
import pytest
import torch

from data_pipeline.transforms import ImageTransform, center_crop, flip_decision, resize_shorter_side, to_float


def test_to_float_matches_the_reference_normalisation_and_inverts():
    k = np.arange(256, dtype=np.uint8).reshape(1, 16, 16)
    x = to_float(k)
    assert torch.equal(x, torch.from_numpy(k).float() / 255 * 2 - 1)
    assert torch.equal(torch.round((x + 1) * 127.5), torch.from_numpy(k).float())


def test_resize_then_crop_shapes():
    image = np.zeros((3, 40, 60), np.uint8)
    assert resize_shorter_side(image, 20).shape == (3, 20, 30)
    assert center_crop(resize_shorter_side(image, 20), 16).shape == (3, 16, 16)
    t = ImageTransform(resize=20, crop=16)
    assert t.output_shape((3, 40, 60)) == (3, 16, 16)
    assert t(image, seed=0, epoch=0, key="k").shape == (3, 16, 16)
    with pytest.raises(ValueError, match="lower data.crop"):
        center_crop(image, 50)


def test_flip_is_horizontal_and_depends_only_on_seed_epoch_key():
    image = np.arange(12, dtype=np.uint8).reshape(1, 3, 4)
    keys = [f"k{i}" for i in range(200)]
    flips = [flip_decision(0, 0, k) for k in keys]
    assert 60 < sum(flips) < 140
    assert flips == [flip_decision(0, 0, k) for k in keys]
    assert flips != [flip_decision(0, 1, k) for k in keys]
    t = ImageTransform(random_flip=True)
    key = keys[flips.index(True)]
    assert torch.equal(t(image, seed=0, epoch=0, key=key), to_float(image[:, :, ::-1]))
    key = keys[flips.index(False)]
    assert torch.equal(t(image, seed=0, epoch=0, key=key), to_float(image))
