"""Measured training-state bytes of a rank, to hold the strategies' memory claims (and memory plans) against."""

from __future__ import annotations

import torch


def training_state_bytes(strategy) -> int:
    """This rank's bytes of parameters + gradients + optimizer state (for DeepSpeed also its fp32 master
    partitions); shared storage counted once."""
    if hasattr(strategy, "engine"):
        return _deepspeed_bytes(strategy)
    from torch.distributed.tensor import DTensor

    def local(t: torch.Tensor) -> int:
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()
    params = sum(local(p) for p in strategy.unwrapped.parameters())
    optimizer = sum(local(v) for state in strategy.optimizer.state.values() for v in state.values()
                    if torch.is_tensor(v) and v.dim() > 0)
    return 2 * params + optimizer  # gradients are as large as the parameters


def _deepspeed_bytes(strategy) -> int:
    """Parameters (stage 3: the partition), fp32 master partitions, gradients (stage 1: all; stages 2 and 3: the
    partition) and AdamW state."""
    seen: set[int] = set()

    def size(t: torch.Tensor | None) -> int:
        if t is None or t.numel() == 0:
            return 0
        key = t.untyped_storage().data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return t.untyped_storage().nbytes()

    params = list(strategy.engine.module.parameters())
    held = sum(size(p.ds_tensor if hasattr(p, "ds_tensor") else p.data) for p in params)
    zero = strategy.optimizer
    masters = getattr(zero, "single_partition_of_fp32_groups", None) or getattr(
        zero, "fp32_partitioned_groups_flat", [])
    held += sum(size(m) for m in masters)
    partition = sum(m.numel() for m in masters)
    full = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in params)
    held += 4 * (full if strategy.stage == 1 else partition)  # fp32 gradients, freed after each step
    held += sum(size(v) for state in zero.optimizer.state.values() for v in state.values()
                if torch.is_tensor(v) and v.dim() > 0)
    return held
