import math

import pytest
import torch

from models import TarFlow, TarFlowConfig, bits_per_dim, uniform_dequantize


def test_bits_per_dim_matches_golden(golden):
    b = golden["bpd"]
    torch.testing.assert_close(bits_per_dim(b["z"], b["logdets"]), b["bpd_per_sample"], rtol=0, atol=1e-9)


def identity_flow(in_channels: int, nvp: bool = True) -> TarFlow:
    model = TarFlow(TarFlowConfig(in_channels=in_channels, img_size=8, patch_size=2, channels=32, head_dim=16,
                                  num_blocks=2, layers_per_block=1, nvp=nvp)).double()
    for block in model.blocks:
        torch.nn.init.zeros_(block.proj_out.bias)  # weight is zero at init: z = x, log|det| = 0
    return model


@pytest.mark.parametrize("in_channels", [1, 3, 4])
def test_bits_per_dim_is_exact_for_any_channel_count(in_channels):
    model = identity_flow(in_channels)
    images = torch.randint(0, 256, (3, in_channels, 8, 8), dtype=torch.uint8)
    x = uniform_dequantize(images, torch.Generator().manual_seed(0)).double()
    z, logdets = model(x)
    n = x[0].numel()
    log_px = torch.distributions.Normal(0.0, 1.0).log_prob(x).flatten(1).sum(1)
    expected = -(log_px - n * math.log(128.0)) / (n * math.log(2.0))
    torch.testing.assert_close(bits_per_dim(z, logdets), expected, rtol=0, atol=1e-12)


def test_bits_per_dim_uses_the_prior_variance():
    model = identity_flow(3, nvp=False)
    model.var.uniform_(0.5, 1.5)
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64) * 2 - 1
    z, logdets = model(x)
    n = x[0].numel()
    log_pz = torch.distributions.Normal(0.0, model.var.sqrt()).log_prob(z).flatten(1).sum(1)
    expected = -(log_pz - n * math.log(128.0)) / (n * math.log(2.0))
    torch.testing.assert_close(bits_per_dim(z, logdets, model.var), expected, rtol=0, atol=1e-12)


def test_uniform_dequantize_stays_in_each_pixels_bin(golden):
    b = golden["bpd"]
    # The golden dequantised input lies in the bins its uint8 image defines ...
    assert torch.equal(((b["x_dequant"] + 1) * 128).floor().to(torch.uint8), b["x_uint8"])
    # ... and so does ours.
    x = uniform_dequantize(b["x_uint8"], torch.Generator().manual_seed(1))
    assert torch.equal(((x + 1) * 128).floor().to(torch.uint8), b["x_uint8"])
    assert x.dtype == torch.float32 and x.min() >= -1 and x.max() < 1


def test_uniform_dequantize_rejects_float_images():
    with pytest.raises(ValueError, match="expects uint8"):
        uniform_dequantize(torch.zeros(1, 3, 4, 4))
