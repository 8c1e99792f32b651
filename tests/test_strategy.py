import copy

import pytest
import torch

from models import TarFlow, TarFlowConfig
from trainer.config import OptimConfig
from trainer.strategies import SingleDevice, build_strategy

TINY = TarFlowConfig(in_channels=1, img_size=8, patch_size=2, channels=32, head_dim=16, num_blocks=2,
                     layers_per_block=1)


def setup(seed=0):
    torch.manual_seed(seed)
    strategy = SingleDevice(torch.device("cpu"))
    strategy.setup(TarFlow(TINY), OptimConfig(lr=1e-2))
    return strategy


def loss_of(strategy, x):
    return TarFlow.loss(*strategy.model(x))


def test_step_clips_to_the_max_norm_and_reports_the_unclipped_norm():
    a, b = setup(), setup()
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    for s in (a, b):
        s.backward(loss_of(s, x) * 1000)  # large gradients
    grads = [p.grad.clone() for p in b.model.parameters()]
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
    result = a.step(lr=1e-2, max_grad_norm=0.5, loss_is_finite=torch.tensor(True))
    assert result.applied and result.grad_norm == pytest.approx(norm.item(), rel=1e-5)
    # Same update as a manual clip followed by AdamW.
    for p, g in zip(b.model.parameters(), grads):
        p.grad = g * (0.5 / (norm + 1e-6))
    b.optimizer.step()
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in a.model.parameters())


def test_nonfinite_loss_or_gradient_skips_the_update():
    s = setup()
    before = copy.deepcopy(s.model.state_dict())
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    s.backward(loss_of(s, x))
    assert not s.step(lr=1e-2, max_grad_norm=1.0, loss_is_finite=torch.tensor(False)).applied
    s.backward(loss_of(s, x) * float("inf"))
    assert not s.step(lr=1e-2, max_grad_norm=0.0, loss_is_finite=torch.tensor(True)).applied
    for k, v in before.items():
        assert torch.equal(v, s.model.state_dict()[k])
    assert s.optimizer.state_dict()["state"] == {}


def test_unknown_strategy_names_the_choices():
    with pytest.raises(ValueError,
                       match=r"train.strategy='ddp2' is not one of \['ddp', 'deepspeed', 'fsdp', 'single'\]"):
        build_strategy("ddp2", torch.device("cpu"))


def test_save_and_load_state_round_trip_model_and_optimizer(tmp_path):
    a, b = setup(0), setup(1)
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    a.backward(loss_of(a, x))
    a.step(lr=1e-2, max_grad_norm=1.0, loss_is_finite=torch.tensor(True))
    a.save_state(tmp_path)
    b.load_state(tmp_path)
    for (k, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(p, q), k
    for s in (a, b):  # the same next step: the optimizer's moments came along
        s.backward(loss_of(s, x))
        s.step(lr=1e-2, max_grad_norm=1.0, loss_is_finite=torch.tensor(True))
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)
    exported = SingleDevice.export_model_state(tmp_path)
    assert exported.keys() == a.model.state_dict().keys()


def test_the_registry_knows_which_strategies_need_a_launcher():
    from trainer.strategies import DISTRIBUTED, STRATEGIES

    assert set(STRATEGIES) == {"single", "ddp", "fsdp", "deepspeed"} and DISTRIBUTED == {"ddp", "fsdp", "deepspeed"}
