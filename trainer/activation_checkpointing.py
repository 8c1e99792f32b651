"""Per-layer transforms applied before sharding: activation checkpointing, then torch.compile (the order FSDP2
expects: checkpointing → compile → sharding)."""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from models import TarFlow


def apply_activation_checkpointing(model: TarFlow, every: int) -> int:
    """Checkpoint every ``every``-th transformer layer (1: all; 0: none); returns how many.

    The layer's ``forward`` is replaced on the instance rather than the module wrapped, so parameter names and
    checkpoints stay the same. Non-reentrant checkpointing re-enters the autocast state of the forward when it
    recomputes, so bf16 runs recompute in bf16 (pytorch#148831 is about losing it); applied before sharding, as
    FSDP2 expects (checkpointing → compile → sharding)."""
    if every < 0:
        raise ValueError(f"train.activation_checkpointing must be >= 0, got {every}")
    if every == 0:
        return 0
    layers = [layer for block in model.blocks for layer in block.attn_blocks]
    for layer in layers[::every]:
        layer.forward = _checkpointed(layer.forward)
    return len(layers[::every])


def _checkpointed(forward):
    def run(h: torch.Tensor, attn_temp: float = 1.0) -> torch.Tensor:
        if not torch.is_grad_enabled():  # evaluation and sampling keep nothing anyway
            return forward(h, attn_temp)
        return checkpoint(forward, h, attn_temp, use_reentrant=False)
    return run


def compile_layers(model: TarFlow) -> int:
    """``torch.compile`` each transformer layer's training forward (the KV-cached ``decode`` stays eager: its
    shapes change with every token). Parameter names are unchanged; returns how many layers."""
    layers = [layer for block in model.blocks for layer in block.attn_blocks]
    for layer in layers:
        layer.forward = torch.compile(layer.forward)
    return len(layers)
