"""CRM and IGM calibration for GS-Jacobi: shapes, that a block made hard is ranked tough, and that the calibrated
settings sample exactly at tol=0."""

import pytest
import torch

from models import TarFlow, TarFlowConfig, calibrate
from models.inversion import INITS

TINY = dict(in_channels=1, img_size=8, patch_size=2, channels=16, head_dim=8, num_blocks=4, layers_per_block=2,
            num_classes=3)


def perturbed(seed: int = 0) -> TarFlow:
    torch.manual_seed(seed)
    model = TarFlow(TarFlowConfig(**TINY)).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.02 if "proj_out" in name else 0.05))
    return model


def test_a_block_with_a_strong_output_layer_is_tough_and_the_settings_plug_in():
    model = perturbed()
    with torch.no_grad():
        model.blocks[2].proj_out.weight.mul_(10)  # block 2 now depends strongly on earlier tokens
    x = torch.rand(6, 1, 8, 8, dtype=torch.float64) * 2 - 1
    y = torch.tensor([0, 1, 2, -1, 0, 1])
    cal = calibrate(model, x, y)
    assert len(cal.crm) == 4 and set(cal.igm) == set(INITS) and all(len(v) == 4 for v in cal.igm.values())
    assert max(range(4), key=lambda k: cal.crm[k]) == 2 and 2 in cal.tough_blocks and 0 not in cal.tough_blocks
    assert calibrate(model, x, y, num_tough=1).tough_blocks == {2}
    assert all(init in INITS for init in cal.init)
    noise = torch.randn(2, 16, 4, dtype=torch.float64)
    stats = []
    expected = model.reverse(noise, y[:2])
    model.reverse(noise, y[:2], method="jacobi", tol=1e-6, stats=stats)
    assert max(stats, key=lambda s: s.passes).block == 2  # the CRM's pick is the block Jacobi finds hardest
    got = model.reverse(noise, y[:2], method="gs-jacobi", tol=0.0, module_size=3, tough_blocks=cal.tough_blocks,
                        init=cal.init)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_igm_prefers_the_noise_for_a_near_identity_model():
    model = perturbed()
    cal = calibrate(model, torch.rand(4, 1, 8, 8, dtype=torch.float64))
    assert cal.init == ("noise",) * 4
    assert all(n < z for n, z in zip(cal.igm["noise"], cal.igm["zeros"]))


@pytest.mark.parametrize("kwargs, message", [(dict(dominance=0), "dominance must be positive, got 0"),
                                             (dict(perturbation=-1.0), "perturbation must be positive"),
                                             (dict(num_tough=5), r"num_tough must be an integer in \[0, 4\]")])
def test_bad_calibration_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        calibrate(perturbed(), torch.zeros(1, 1, 8, 8, dtype=torch.float64), **kwargs)
