"""Device and numeric precision: configuration, never a code fork."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` is CUDA (this process's local GPU) when present, else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"train.device={name!r} but CUDA is not available on this machine; use auto or cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


@dataclass(frozen=True)
class Precision:
    """bf16 autocast around forward and loss, or plain fp32. Parameters, gradients and optimizer state stay fp32."""

    autocast_dtype: torch.dtype | None

    @property
    def name(self) -> str:
        return "bf16" if self.autocast_dtype is torch.bfloat16 else "fp32"

    def autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)


def resolve_precision(name: str, device: torch.device, noise: str) -> Precision:
    """``auto``: bf16 on CUDA devices that support it; fp32 on CPU (bf16 matmuls are slow there) and always for
    uniform dequantisation, whose bits/dim need fp32 (as the reference's density runs)."""
    if name == "fp32" or (name == "auto" and (noise == "uniform" or device.type != "cuda"
                                              or not torch.cuda.is_bf16_supported())):
        return Precision(None)
    return Precision(torch.bfloat16)
