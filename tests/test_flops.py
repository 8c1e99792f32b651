import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from models import TarFlow, TarFlowConfig
from trainer.flops import default_peak_flops, flops_per_image, mfu, peak_flops_for_name

aten = torch.ops.aten

# FlopCounterMode has no formula for the fused CPU attention kernel (it would count 0); mapping it to the CUDA
# fused kernels' formulas makes the CPU measurement count what a GPU run (flash/efficient/cuDNN) counts.
# (FlopCounterMode passes shapes, in the ops' argument order: q, k, v, ... and grad_out, q, k, v, ...)
CUDA_LIKE_ATTENTION = {
    aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v),
    aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad_out, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(grad_out, q, k, v),
}

CONFIGS = [
    TarFlowConfig(in_channels=1, img_size=8, patch_size=2, channels=32, head_dim=16, num_blocks=2,
                  layers_per_block=2, nvp=nvp, num_classes=classes)
    for nvp in (True, False) for classes in (0, 10)
]
BATCH = 3


def _inputs(config: TarFlowConfig):
    torch.manual_seed(0)
    model = TarFlow(config)
    x = torch.rand(BATCH, config.in_channels, config.img_size, config.img_size) * 2 - 1
    y = torch.tensor([1, -1, 7]) if config.conditional else None
    return model, x, y


def _count(fn, backend: SDPBackend, custom_mapping=None) -> int:
    with sdpa_kernel(backend), FlopCounterMode(display=False, custom_mapping=custom_mapping) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("backend", [SDPBackend.MATH, SDPBackend.FLASH_ATTENTION])
def test_forward_count_matches_flop_counter_exactly(config, backend):
    model, x, y = _inputs(config)
    with torch.no_grad():
        measured = _count(lambda: model(x, y), backend, CUDA_LIKE_ATTENTION)
    assert measured == BATCH * flops_per_image(config).forward


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("backend", [SDPBackend.MATH, SDPBackend.FLASH_ATTENTION])
def test_train_count_matches_flop_counter_exactly(config, backend):
    model, x, y = _inputs(config)

    def step():
        model.loss(*model(x, y)).backward()

    measured = _count(step, backend, CUDA_LIKE_ATTENTION)
    count = flops_per_image(config)
    fused = backend != SDPBackend.MATH
    assert measured == BATCH * count.train_executed(fused_attention=fused)
    # The 3x convention differs only by the skipped input gradient of block 0 and the fused kernels' recompute.
    assert count.train == 3 * count.forward
    expected_gap = -count.skipped_input_grad + (count.attention // 2 if fused else 0)
    assert count.train_executed(fused) - count.train == expected_gap


def test_fused_cpu_attention_is_invisible_to_flop_counter_without_mapping():
    # Documents why the tests above pass a custom mapping: without it, CPU attention counts nothing.
    config = CONFIGS[0]
    model, x, y = _inputs(config)
    with torch.no_grad():
        measured = _count(lambda: model(x, y), SDPBackend.FLASH_ATTENTION)
    count = flops_per_image(config)
    assert measured == BATCH * (count.forward - count.attention)


def test_attention_ignores_causality_like_flop_counter():
    config = CONFIGS[0]
    L, C = config.num_patches - 1, config.channels
    assert flops_per_image(config).attention == config.num_blocks * config.layers_per_block * 4 * L * L * C


def test_paper_scale_numbers_are_plausible():
    # ImageNet-64-like model: forward FLOPs ≈ 2 · params · tokens per block dominates.
    config = TarFlowConfig(in_channels=3, img_size=64, patch_size=2, channels=768, num_blocks=8,
                           layers_per_block=8, num_classes=1000)
    count = flops_per_image(config)
    L, C = config.num_patches - 1, config.channels
    linear = config.num_blocks * config.layers_per_block * 2 * L * 12 * C * C
    assert linear < count.forward < 1.5 * linear


def test_mfu_and_peaks():
    assert mfu(494.5e12, 989e12) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        mfu(1.0, 0.0)
    assert default_peak_flops(torch.device("cpu"), torch.bfloat16) is None
    assert peak_flops_for_name("NVIDIA H200", "bf16") == 989e12
    assert peak_flops_for_name("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert peak_flops_for_name("NVIDIA H100 PCIe", "bf16") == 756e12
    assert peak_flops_for_name("NVIDIA A100-SXM4-80GB", "bf16") == 312e12
    assert peak_flops_for_name("NVIDIA A100-SXM4-80GB", "tf32") == 156e12
    assert peak_flops_for_name("NVIDIA GeForce GTX 1080", "bf16") is None
