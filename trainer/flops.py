"""Analytic FLOP counts of a TarFlow (training and KV-cached sampling) and model FLOPs utilisation (MFU).

Conventions (they match ``torch.utils.flop_counter.FlopCounterMode``, checked exactly in tests/test_flops.py):

* Only matrix products count, at 2·m·n·k per (m×k)·(k×n) product. LayerNorm, GELU, softmax, exp, bias and residual
  additions are not counted (they are memory-bound and small next to the matmuls).
* Attention is counted as two full L×L batched matmuls, 4·L²·C per sequence of L tokens (C = heads × head_dim),
  *ignoring causality*: FlopCounterMode's formula for the fused SDPA kernels (flash, efficient, cuDNN) does
  not look at ``is_causal`` ("We aren't accounting for causal attention here"), and the math backend really
  computes the full L×L scores before masking. This is also PaLM's MFU convention (its per-token attention term
  12·layers·H·Q·T counts the whole T×T matrix). A causal kernel that skips the masked half does about half this
  attention work, so MFU from these counts flatters it by up to half the attention share, which per layer is
  4L²C against 24·L·C² for the linear layers (expansion 4): a ratio L/(6C), e.g. 0.22 at L=1023, C=768.
* ``train`` = 3 × ``forward`` (forward + backward computing input and weight gradients: 2 × forward) — the
  usual "model FLOPs" for MFU. What autograd actually executes differs in two ways, see ``FlopCount``.

FlopCounterMode on CPU counts *zero* for the fused CPU attention kernel
(``aten._scaled_dot_product_flash_attention_for_cpu`` has no formula registered), so a measured CPU count
misses attention unless the math backend is forced or that op is mapped to the CUDA kernels' formula.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models import TarFlowConfig

# Dense (no structured sparsity) tensor-core peaks in FLOP/s from NVIDIA's datasheets, per GPU.
# Keys are substrings of torch.cuda.get_device_name(), checked in order (more specific names first).
# Values: {bf16, fp16, tf32, fp32}; fp32 is the non-tensor-core rate (matmuls with TF32 disabled).
_PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 NVL", {"bf16": 835e12, "fp16": 835e12, "tf32": 417.5e12, "fp32": 60e12}),
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12}),
    # H100 SXM5 ("NVIDIA H100 80GB HBM3"), H200 SXM, GH200 and H800 SXM share the H100 SXM compute peaks.
    ("H100", {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12, "fp32": 67e12}),
    ("H200", {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12, "fp32": 67e12}),
    ("H800", {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12, "fp32": 67e12}),
    ("A100", {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    ("L40S", {"bf16": 362e12, "fp16": 362e12, "tf32": 183e12, "fp32": 91.6e12}),
    ("B200", {"bf16": 2250e12, "fp16": 2250e12}),
)


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of ONE image through a TarFlow.

    ``forward``: the forward pass. ``attention``: the part of ``forward`` spent in attention (full L×L).
    ``skipped_input_grad``: the input gradient of block 0's ``proj_in``, which autograd does not compute in
    training because the images do not require grad (``denoise`` does compute it).

    ``train`` (= 3 × forward) is the convention for MFU. Autograd executes ``train_executed(...)`` instead:
    ``train − skipped_input_grad``, plus ``attention / 2`` with fused attention kernels, whose backward
    recomputes the score matrix (FlopCounterMode counts 5 L×L matmuls in their backward, the math backend 4).
    """

    forward: int
    attention: int
    skipped_input_grad: int

    @property
    def train(self) -> int:
        return 3 * self.forward

    def train_executed(self, fused_attention: bool) -> int:
        """Forward + backward as FlopCounterMode counts a training step (images not requiring grad)."""
        recompute = self.attention // 2 if fused_attention else 0
        return self.train - self.skipped_input_grad + recompute


def flops_per_image(config: TarFlowConfig) -> FlopCount:
    """Matmul FLOPs of one image through ``TarFlow.forward`` (see the module docstring for the conventions).

    Each block's transformer runs on L = T − 1 tokens (the last token's output would parameterise a token that
    does not exist, so models/flow_block.py skips it)."""
    c = config
    L, D, C, e = c.num_patches - 1, c.patch_dim, c.channels, c.expansion
    out_dim = 2 * D if c.nvp else D
    per_layer_linear = 2 * L * C * (3 * C + C + 2 * e * C)  # qkv, proj, MLP up and down
    per_layer_attention = 4 * L * L * C  # q·kᵀ and softmax·v, all heads, full L×L
    per_block = 2 * L * D * C + 2 * L * C * out_dim + c.layers_per_block * (per_layer_linear + per_layer_attention)
    return FlopCount(
        forward=c.num_blocks * per_block,
        attention=c.num_blocks * c.layers_per_block * per_layer_attention,
        skipped_input_grad=2 * L * D * C,
    )


def mfu(flops_per_second: float, peak_flops_per_second: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s (e.g. ``train`` × images/s) over the hardware peak."""
    if peak_flops_per_second <= 0:
        raise ValueError(f"peak_flops_per_second must be positive, got {peak_flops_per_second}")
    return flops_per_second / peak_flops_per_second


def default_peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Datasheet dense peak FLOP/s of one known accelerator for matmuls in ``dtype`` (the autocast dtype when
    training under autocast); None for CPUs, unknown GPUs or unknown dtypes — the trainer then needs a configured
    peak. float32 uses the TF32 tensor-core peak when torch allows TF32 matmuls, else the plain fp32 rate."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    if dtype == torch.bfloat16:
        key = "bf16"
    elif dtype == torch.float16:
        key = "fp16"
    elif dtype == torch.float32:
        key = "tf32" if _tf32_matmuls_allowed() else "fp32"
    else:
        return None
    return peak_flops_for_name(name, key)


def _tf32_matmuls_allowed() -> bool:
    # torch >= 2.9 has per-backend precision settings, and get_float32_matmul_precision() raises once they were
    # set directly; set_float32_matmul_precision("high") shows up there as "tf32" too.
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    return precision == "tf32" if precision is not None else bool(matmul.allow_tf32)


def peak_flops_for_name(device_name: str, key: str) -> float | None:
    """Table lookup behind ``default_peak_flops``: ``key`` is one of bf16, fp16, tf32, fp32."""
    for pattern, peaks in _PEAK_FLOPS:
        if pattern in device_name:
            return peaks.get(key)
    return None
