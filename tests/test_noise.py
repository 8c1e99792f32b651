import math

import torch

from trainer.noise import corrupt, denoise_std, dequantize, drop_labels, sample_generators, to_8bit

CPU = torch.device("cpu")


def normalised(k: torch.Tensor) -> torch.Tensor:
    return k.float().div(255).mul(2).sub(1)  # the loaders' normalisation


def gens(purpose: str, indices, step: int = 1, seed: int = 0):
    return sample_generators(purpose, seed, step, torch.as_tensor(indices), CPU)


def test_dequantisation_lands_in_each_pixels_bin():
    k = torch.arange(256).repeat(40).view(40, 256)  # 40 samples of 256 pixels
    x = dequantize(normalised(k), gens("noise", range(40)))
    assert torch.equal(to_8bit(normalised(k)), k.float())
    assert torch.equal(torch.floor((x + 1) * 128), k.float())
    # u ~ U[0, 1): the mean offset inside the bin is about one half
    assert abs(((x + 1) * 128 - k).mean().item() - 0.5) < 0.02


def test_a_samples_draw_depends_on_its_index_and_step_not_on_its_batch():
    x = torch.zeros(8, 3, 4, 4)
    whole = corrupt(x, "uniform", 0.0, gens("noise", range(8)))
    # the same samples split over two "ranks" in another order get the same noise
    part = corrupt(x[:3], "uniform", 0.0, gens("noise", [6, 1, 3]))
    assert torch.equal(part, whole[[6, 1, 3]])
    assert not torch.equal(whole[0], whole[1])
    assert not torch.equal(corrupt(x, "uniform", 0.0, gens("noise", range(8), step=2)), whole)
    assert not torch.equal(corrupt(x, "uniform", 0.0, gens("noise", range(8), seed=1)), whole)
    assert not torch.equal(corrupt(x, "uniform", 0.0, gens("heldout", range(8))), whole)


def test_gaussian_noise_has_the_configured_std():
    x = torch.zeros(200, 1000)
    noisy = corrupt(x, "gaussian", 0.05, gens("noise", range(200)))
    assert abs(noisy.std().item() - 0.05) < 5e-4


def test_label_drop_marks_dropped_labels_minus_one_per_sample():
    y = torch.randint(0, 10, (20_000,), generator=torch.Generator().manual_seed(0))
    dropped = drop_labels(y, 0.1, gens("label_drop", range(20_000)))
    mask = dropped == -1
    assert abs(mask.float().mean().item() - 0.1) < 0.01
    assert torch.equal(dropped[~mask], y[~mask])
    assert torch.equal(drop_labels(y, 0.0, []), y)
    # sample i's decision is its own: the same in a batch of other samples
    some = drop_labels(y[[5, 17, 40]], 0.1, gens("label_drop", [5, 17, 40]))
    assert torch.equal(some, dropped[[5, 17, 40]])


def test_denoise_std_matches_the_corruption():
    assert denoise_std("gaussian", 0.07) == 0.07
    assert math.isclose(denoise_std("uniform", 0.07), (1 / 128) / math.sqrt(12))
