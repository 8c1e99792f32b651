import math

import torch

from trainer.noise import corrupt, denoise_std, dequantize, drop_labels, to_8bit


def normalised(k: torch.Tensor) -> torch.Tensor:
    return k.float().div(255).mul(2).sub(1)  # the loaders' normalisation


def test_dequantisation_lands_in_each_pixels_bin():
    k = torch.arange(256).repeat(40)
    x = dequantize(normalised(k), torch.Generator().manual_seed(0))
    assert torch.equal(to_8bit(normalised(k)), k.float())
    assert torch.equal(torch.floor((x + 1) * 128), k.float())
    # u ~ U[0, 1): the mean offset inside the bin is about one half
    assert abs(((x + 1) * 128 - k).mean().item() - 0.5) < 0.02


def test_gaussian_noise_has_the_configured_std():
    torch.manual_seed(0)
    x = torch.zeros(200_000)
    noisy = corrupt(x, "gaussian", 0.05)
    assert abs(noisy.std().item() - 0.05) < 5e-4


def test_label_drop_marks_dropped_labels_minus_one():
    torch.manual_seed(0)
    y = torch.randint(0, 10, (100_000,))
    dropped = drop_labels(y, 0.1)
    mask = dropped == -1
    assert abs(mask.float().mean().item() - 0.1) < 0.005
    assert torch.equal(dropped[~mask], y[~mask])
    assert torch.equal(drop_labels(y, 0.0), y)


def test_denoise_std_matches_the_corruption():
    assert denoise_std("gaussian", 0.07) == 0.07
    assert math.isclose(denoise_std("uniform", 0.07), (1 / 128) / math.sqrt(12))
