import pytest
import torch

from trainer.runtime import resolve_device, resolve_precision


def test_auto_device_is_cpu_without_cuda():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_cuda_without_it_is_a_clear_error():
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")


def test_precision_choices():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu, "gaussian").autocast_dtype is None  # bf16 matmuls are slow on CPU
    assert resolve_precision("bf16", cpu, "gaussian").autocast_dtype is torch.bfloat16
    assert resolve_precision("fp32", cpu, "gaussian").autocast_dtype is None
    with resolve_precision("bf16", cpu, "gaussian").autocast(cpu):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype is torch.bfloat16
