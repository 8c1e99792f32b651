import pytest
import torch

from data_pipeline import DataConfig, build_loader
from models import TarFlow, TarFlowConfig, bits_per_dim
from trainer.evaluation.bpd import collective_bits_per_dim, heldout_bits_per_dim
from trainer.noise import dequantize, sample_generators

TINY = TarFlowConfig(in_channels=1, img_size=8, patch_size=2, channels=32, head_dim=16, num_blocks=2,
                     layers_per_block=1, num_classes=10)
CPU = torch.device("cpu")


def test_heldout_bits_per_dim_is_the_mean_over_every_heldout_image():
    torch.manual_seed(0)
    model = TarFlow(TINY)
    loader = build_loader(DataConfig(), "heldout", 64, seed=0)
    bpd, n = heldout_bits_per_dim(model, loader, CPU, seed=3)
    values = []
    for x, y, indices in build_loader(DataConfig(), "heldout", 64, seed=0):
        with torch.no_grad():
            noisy = dequantize(x, sample_generators("heldout", 3, 0, indices, CPU))
            values.append(bits_per_dim(*model(noisy, y), model.var))
    expected = torch.cat(values)
    assert n == expected.numel() == 180
    assert abs(bpd - expected.mean().item()) < 1e-12


def test_evaluation_is_deterministic_rewinds_and_leaves_the_training_rng_alone():
    model = TarFlow(TINY)
    loader = build_loader(DataConfig(), "heldout", 50, seed=0)
    torch.manual_seed(5)
    first = heldout_bits_per_dim(model, loader, CPU)
    after = torch.rand(1)
    torch.manual_seed(5)
    assert heldout_bits_per_dim(model, loader, CPU) == first
    assert torch.equal(torch.rand(1), after)
    # a pass that stops early (max_images) does not make the next one read other images
    capped = heldout_bits_per_dim(model, loader, CPU, max_images=70)
    assert capped[1] == 70
    assert heldout_bits_per_dim(model, loader, CPU, max_images=70) == capped


@pytest.mark.parametrize("max_images", [0, 71])
def test_the_ranks_shares_add_up_to_the_single_process_result(max_images):
    """Each image's noise is keyed by its index and max_images keeps the indices below it: two ranks' sums give
    the one-rank mean (the collective's all-reduce of these sums is tested with real ranks in test_ddp)."""
    model = TarFlow(TINY)
    one = heldout_bits_per_dim(model, build_loader(DataConfig(), "heldout", 50, seed=0), CPU, max_images=max_images)
    assert collective_bits_per_dim(model, build_loader(DataConfig(), "heldout", 50, seed=0), CPU,
                                   max_images=max_images) == (pytest.approx(one[0], rel=1e-15), one[1])
    shares = [heldout_bits_per_dim(model, build_loader(DataConfig(), "heldout", 16, seed=0, rank=r, world_size=2),
                                   CPU, max_images=max_images) for r in range(2)]
    assert sum(n for _, n in shares) == one[1] == (max_images or 180)
    assert sum(b * n for b, n in shares) / one[1] == pytest.approx(one[0], rel=1e-12)
