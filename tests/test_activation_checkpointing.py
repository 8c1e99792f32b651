import pytest
import torch

from models import TarFlow, TarFlowConfig
from trainer.activation_checkpointing import apply_activation_checkpointing

TINY = TarFlowConfig(in_channels=1, img_size=8, patch_size=2, channels=32, head_dim=16, num_blocks=2,
                     layers_per_block=2, num_classes=10)


def grads(every: int, autocast: bool = False):
    torch.manual_seed(0)
    model = TarFlow(TINY)
    count = apply_activation_checkpointing(model, every)
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    y = torch.tensor([1, -1, 3, 9])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = TarFlow.loss(*model(x, y))
    loss.backward()
    return count, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, model


@pytest.mark.parametrize("every, expected", [(1, 4), (2, 2), (3, 2)])
@pytest.mark.parametrize("autocast", [False, True])
def test_checkpointing_changes_nothing_but_memory(every, expected, autocast):
    _, loss, reference, _ = grads(0, autocast)
    count, loss_ac, got, model = grads(every, autocast)
    assert count == expected
    assert torch.equal(loss, loss_ac)
    for name in reference:  # recomputation repeats the same kernels, in bf16 too (autocast survives it)
        assert torch.equal(reference[name], got[name]), name
    assert list(model.state_dict()) == list(TarFlow(TINY).state_dict())  # names unchanged


def test_checkpointing_saves_activation_memory():
    def saved_bytes(every):
        torch.manual_seed(0)
        model = TarFlow(TINY)
        apply_activation_checkpointing(model, every)
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            TarFlow.loss(*model(torch.rand(16, 1, 8, 8)))
        return total
    assert saved_bytes(1) < 0.5 * saved_bytes(0)


def test_negative_is_rejected():
    with pytest.raises(ValueError, match="activation_checkpointing must be >= 0"):
        apply_activation_checkpointing(TarFlow(TINY), -1)


def test_compiled_layers_with_checkpointing_match_eager():
    from trainer.activation_checkpointing import compile_layers

    _, loss, reference, _ = grads(0)
    torch.manual_seed(0)
    model = TarFlow(TINY)
    apply_activation_checkpointing(model, 2)
    assert compile_layers(model) == 4
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    compiled_loss = TarFlow.loss(*model(x, torch.tensor([1, -1, 3, 9])))
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss.detach(), loss, rtol=1e-5, atol=1e-6)  # fused kernels round differently
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, reference[name], rtol=1e-4, atol=1e-6)
    assert list(model.state_dict()) == list(TarFlow(TINY).state_dict())
