"""The cost model behind method="auto": pass costs, the latency-bound window, validation, and a real measurement."""

import pytest
import torch

from models import TarFlow, TarFlowConfig
from models.inversion_costs import MIN_BREAK_EVEN_PASSES, CostModel

SIZES = (1, 2, 4, 8, 15)


def test_pass_cost_is_the_smallest_measured_size_that_holds_the_tokens():
    costs = CostModel(step=1.0, sizes=SIZES, chunk=(1.0, 1.1, 1.5, 3.0, 6.0))
    assert [costs.pass_cost(n) for n in (1, 2, 3, 4, 5, 8, 15)] == [1.0, 1.1, 1.5, 1.5, 3.0, 3.0, 6.0]
    assert costs.pass_cost(30) == pytest.approx(12.0)  # linear beyond the largest
    assert costs.break_even_passes == 2.5  # 15 steps of 1.0 = 2.5 full passes of 6.0
    assert costs.break_even_passes < MIN_BREAK_EVEN_PASSES and not costs.worth_iterating
    assert CostModel(step=1.0, sizes=SIZES, chunk=(1.0, 1.0, 1.0, 1.5, 3.0)).worth_iterating  # 5 passes


@pytest.mark.parametrize("kwargs, message", [
    (dict(step=1.0, sizes=(1, 2), chunk=(1.0,)), "increasing sizes with one cost each"),
    (dict(step=1.0, sizes=(2, 1), chunk=(1.0, 1.0)), "increasing sizes"),
    (dict(step=0.0, sizes=(1,), chunk=(1.0,)), "costs must be positive"),
])
def test_bad_cost_models_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CostModel(**kwargs)


def test_auto_measures_once_per_batch_shape():
    from models import inversion_costs

    torch.manual_seed(0)
    model = TarFlow(TarFlowConfig(in_channels=1, img_size=8, patch_size=2, channels=16, head_dim=8, num_blocks=2,
                                  layers_per_block=1, num_classes=3))
    noise = torch.randn(2, 16, 4)
    before = len(inversion_costs._MEASURED)
    model.reverse(noise, method="auto")
    model.reverse(noise, method="auto")  # both blocks and both calls share one measurement
    model.reverse(noise, guidance=1.0, method="auto")  # twice the rows: another
    assert len(inversion_costs._MEASURED) == before + 2
    measured = list(inversion_costs._MEASURED.values())[-1]
    assert measured.sizes == SIZES and measured.step > 0 and all(c > 0 for c in measured.chunk)
