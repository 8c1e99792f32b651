import math
import os
import stat

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.evaluation.image_grid import image_grid, save_image_grid, save_samples_npz


def test_known_two_image_rgb_grid_exact_pixels():
    # Image 0: all -1 except one pixel; image 1: constant values per channel.
    a = -torch.ones(3, 2, 2)
    a[:, 0, 1] = torch.tensor([1.0, 0.0, 0.5])
    b = torch.stack([torch.full((2, 2), v) for v in (1.0, 2.0, -3.0)])  # out of range: clipped
    grid = image_grid(torch.stack([a, b]), padding=1)
    # nrow = ceil(sqrt(2)) = 2: one row of two 2×2 cells with 1-pixel black borders → 4 × 7.
    assert grid.shape == (4, 7, 3) and grid.dtype == np.uint8
    expected = np.zeros((4, 7, 3), dtype=np.uint8)
    expected[1:3, 4:6] = [255, 255, 0]
    expected[1, 2] = [255, 128, 191]  # round(127.5) = 128 (half to even), round(191.25) = 191
    np.testing.assert_array_equal(grid, expected)


def test_nrow_and_padding_layout():
    images = torch.zeros(5, 3, 4, 3)
    grid = image_grid(images, nrow=2, padding=2)
    assert grid.shape == (3 * (4 + 2) + 2, 2 * (3 + 2) + 2, 3)
    assert grid[2, 2, 0] == 128 and grid[0, 0, 0] == 0
    assert grid[2 + 2 * 6, 2 + 5].max() == 0  # sixth cell (unused) stays black
    assert image_grid(torch.zeros(10, 1, 2, 2), padding=0).shape == (3 * 2, math.ceil(math.sqrt(10)) * 2, 3)


def test_one_channel_becomes_grey():
    x = torch.linspace(-1, 1, 4).view(1, 1, 2, 2)
    grid = image_grid(x, padding=0)
    assert grid.shape == (2, 2, 3)
    assert (grid[..., 0] == grid[..., 1]).all() and (grid[..., 1] == grid[..., 2]).all()
    np.testing.assert_array_equal(grid[..., 0], [[0, 85], [170, 255]])


def test_nan_and_inf_handling():
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0]).view(1, 1, 2, 2)
    np.testing.assert_array_equal(image_grid(x, padding=0)[..., 0], [[0, 255], [0, 128]])


def test_bfloat16_and_bad_shapes():
    assert image_grid(torch.zeros(1, 3, 2, 2, dtype=torch.bfloat16), padding=0)[0, 0, 0] == 128
    with pytest.raises(ValueError):
        image_grid(torch.zeros(1, 2, 2, 2))
    with pytest.raises(ValueError):
        image_grid(torch.zeros(3, 2, 2))


def test_png_round_trips_and_scales(tmp_path):
    torch.manual_seed(0)
    images = torch.rand(3, 1, 8, 8) * 2 - 1
    path = save_image_grid(images, tmp_path / "sub" / "grid.png")
    np.testing.assert_array_equal(np.asarray(Image.open(path).convert("RGB")), image_grid(images))

    big = save_image_grid(images, tmp_path / "big.png", nrow=3, scale=4)
    small = image_grid(images, nrow=3)
    loaded = np.asarray(Image.open(big))
    assert loaded.shape == (small.shape[0] * 4, small.shape[1] * 4, 3)
    np.testing.assert_array_equal(loaded[::4, ::4], small)
    np.testing.assert_array_equal(loaded[3::4, 3::4], small)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.png", "sub"]  # no temporary files left


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "grid.png"
    save_image_grid(torch.zeros(1, 3, 2, 2), path)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", boom)
    with pytest.raises(OSError):
        save_image_grid(torch.ones(1, 3, 2, 2), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]


def test_save_samples_npz_round_trip(tmp_path):
    path = save_samples_npz(tmp_path / "samples_step10", images=torch.arange(6).view(2, 3), labels=np.array([1, 2]))
    assert path.name == "samples_step10"  # exact name, no ".npz" appended
    with np.load(path) as data:
        np.testing.assert_array_equal(data["images"], np.arange(6).reshape(2, 3))
        np.testing.assert_array_equal(data["labels"], [1, 2])


@pytest.mark.parametrize("umask", [0o022, 0o007, 0o077])
def test_outputs_get_the_mode_a_plain_open_gives_under_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        with open(tmp_path / "plain", "wb"):  # the independent truth: what any newly created file gets
            pass
        png = save_image_grid(torch.zeros(1, 3, 2, 2), tmp_path / "grid.png")
        npz = save_samples_npz(tmp_path / "samples.npz", images=np.zeros(2))
    finally:
        os.umask(previous)
    expected = stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    assert expected == 0o666 & ~umask
    assert stat.S_IMODE(png.stat().st_mode) == expected
    assert stat.S_IMODE(npz.stat().st_mode) == expected
