import pytest
import torch

from data_pipeline import DataConfig, build_loader
from models import TarFlow, TarFlowConfig, bits_per_dim
from trainer.evaluation.bpd import collective_bits_per_dim, heldout_bits_per_dim
from trainer.noise import dequantize

TINY = TarFlowConfig(in_channels=1, img_size=8, patch_size=2, channels=32, head_dim=16, num_blocks=2,
                     layers_per_block=1, num_classes=10)


def test_heldout_bits_per_dim_is_the_mean_over_every_heldout_image():
    torch.manual_seed(0)
    model = TarFlow(TINY)
    loader = build_loader(DataConfig(), "heldout", 64, seed=0)
    bpd, n = heldout_bits_per_dim(model, loader, torch.device("cpu"), seed=3)
    generator = torch.Generator().manual_seed(3)
    values = []
    for x, y in build_loader(DataConfig(), "heldout", 64, seed=0):
        with torch.no_grad():
            values.append(bits_per_dim(*model(dequantize(x, generator), y), model.var))
    expected = torch.cat(values)
    assert n == expected.numel() == 180
    assert abs(bpd - expected.mean().item()) < 1e-12


def test_evaluation_is_deterministic_and_leaves_the_training_rng_alone():
    model = TarFlow(TINY)
    loader = build_loader(DataConfig(), "heldout", 50, seed=0)
    torch.manual_seed(5)
    first = heldout_bits_per_dim(model, loader, torch.device("cpu"))
    after = torch.rand(1)
    torch.manual_seed(5)
    assert heldout_bits_per_dim(model, loader, torch.device("cpu")) == first
    assert torch.equal(torch.rand(1), after)
    assert heldout_bits_per_dim(model, loader, torch.device("cpu"), max_images=70)[1] == 70


def test_the_collective_splits_the_image_cap_over_the_ranks():
    model = TarFlow(TINY)
    loader = build_loader(DataConfig(), "heldout", 50, seed=0)
    bpd, n = heldout_bits_per_dim(model, loader, torch.device("cpu"))
    assert collective_bits_per_dim(model, loader, torch.device("cpu")) == (pytest.approx(bpd, rel=1e-15), n)
    assert collective_bits_per_dim(model, loader, torch.device("cpu"), max_images=70)[1] == 70
    # one rank of two evaluates ceil(71 / 2) images of its share (this process is the only one: nothing to add)
    share = build_loader(DataConfig(), "heldout", 50, seed=0, rank=0, world_size=2)
    assert collective_bits_per_dim(model, share, torch.device("cpu"), max_images=71, world_size=2)[1] == 36
