"""Sample grids of fixed noise: with and without guidance, before and after the denoising step."""

import numpy as np
import torch

from models import TarFlow, TarFlowConfig
from trainer.evaluation.grids import guidance_settings, sample_grids, save_grids
from trainer.evaluation.sampler import SamplingSettings, fixed_noise_and_labels
from trainer.runtime import Precision

TINY = TarFlowConfig(in_channels=1, img_size=8, patch_size=2, channels=32, head_dim=16, num_blocks=2,
                     layers_per_block=1, num_classes=10)


def test_grids_with_and_without_guidance_before_and_after_denoising(tmp_path):
    torch.manual_seed(0)
    model = TarFlow(TINY)
    noise, labels = fixed_noise_and_labels(model, 12, seed=4)
    assert labels.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    noise[3] = float("nan")  # one broken sample must not spoil the others' denoising
    settings = guidance_settings([0.0, 2.0, 2.0], SamplingSettings(attn_temp=1.0, annealed=False, denoise_std=0.05))
    result = sample_grids(model, noise, labels, settings, device=torch.device("cpu"), precision=Precision(None))
    assert set(result.images) == {"g0", "g0_denoised", "g2", "g2_denoised"}
    assert result.nonfinite == {"g0": 1, "g0_denoised": 1, "g2": 1, "g2_denoised": 1}
    expected = model.denoise(result.images["g0"][4:], labels[4:], noise_std=0.05)
    torch.testing.assert_close(result.images["g0_denoised"][4:], expected, rtol=0, atol=1e-6)
    paths = save_grids(result, tmp_path, "x_", labels)
    assert sorted(p.name for p in paths) == ["x_g0.png", "x_g0_denoised.png", "x_g2.png", "x_g2_denoised.png"]
    arrays = np.load(tmp_path / "x_samples.npz")
    assert arrays["g2"].shape == (12, 1, 8, 8) and arrays["labels"].tolist() == labels.tolist()
