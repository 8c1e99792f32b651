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


# ---------------------------------------------------------------- measured by walking what the strategy holds
_WALKED_PACKAGES = ("deepspeed", "torch.optim")  # objects of these packages are searched for the tensors they hold


def held_tensor_bytes(strategy) -> dict[str, int]:
    """This rank's bytes of every tensor storage the strategy's model and optimizer hold, found by walking them
    (every attribute, list and dict of the optimizer objects, recursively), each storage counted once at its
    allocated size (padding included), in the first of these categories that reaches it: ``parameters`` (what the
    module's parameters hold; ZeRO-3: the partition and any gathered copy), ``gradients`` (the parameters'
    ``.grad``, and every tensor an optimizer attribute named like a gradient holds), ``ema`` (the strategy's weight
    average, when it keeps one), ``optimizer`` (the rest: moments, step counters, fp32 master copies). Knows nothing
    about how a strategy ought to shard: it measures.

    Call it between backward and the optimizer step to see gradients and optimizer state at once."""
    counted: dict[int, int] = {}  # storage data_ptr -> bytes
    totals = {"parameters": 0, "gradients": 0, "optimizer": 0, "ema": 0}

    def add(t, category: str) -> None:
        if not isinstance(t, torch.Tensor):
            return
        from torch.distributed.tensor import DTensor
        if isinstance(t, DTensor):
            t = t.to_local()
        storage = t.untyped_storage()
        if storage.nbytes() == 0 or storage.data_ptr() in counted:
            return
        counted[storage.data_ptr()] = storage.nbytes()
        totals[category] += storage.nbytes()

    module = strategy.unwrapped
    params = list(module.parameters())
    for p in params:
        add(p.data, "parameters")
        add(getattr(p, "ds_tensor", None), "parameters")
    for p in params:
        add(p.grad, "gradients")
    for average in getattr(strategy.ema, "averages", {}).values():
        add(average, "ema")
    seen: set[int] = set()

    def walk(obj, category: str, depth: int) -> None:
        if depth > 8 or id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            add(obj, category)
            if obj.grad is not None:
                add(obj.grad, "gradients")
            return
        if isinstance(obj, torch.nn.Module):  # the model was counted above; its wrappers hold nothing more
            return
        if isinstance(obj, dict):
            for key, value in obj.items():
                walk(key, category, depth + 1)
                walk(value, _category(key, category), depth + 1)
        elif isinstance(obj, (list, tuple, set)):
            for item in obj:
                walk(item, category, depth + 1)
        elif type(obj).__module__.startswith(_WALKED_PACKAGES):
            for key, value in vars(obj).items() if hasattr(obj, "__dict__") else ():
                walk(value, _category(key, category), depth + 1)

    walk(strategy.optimizer, "optimizer", 0)
    return totals


def _category(name, inherited: str) -> str:
    return "gradients" if isinstance(name, str) and "grad" in name.lower() and inherited == "optimizer" \
        else inherited


# ---------------------------------------------------------------- activations, measured
def forward_retained_bytes(model: torch.nn.Module, *inputs: torch.Tensor, autocast_dtype=None) -> int:
    """Bytes of the tensors one forward (and ``TarFlow.loss``) creates that are still alive when it returns: what
    autograd (and activation checkpointing) keeps for backward, whatever keeps it. Every tensor an operator makes is
    watched through a weak reference to its storage (a dispatch mode sees every operator below autograd); storages
    of the parameters, buffers and inputs, which existed before, are not counted."""
    import gc

    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    made: list[tuple[StorageWeakRef, int, int]] = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    s = t.untyped_storage()
                    made.append((StorageWeakRef(s), s.data_ptr(), s.nbytes()))
            return out

    before = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), *inputs]}
    with Watch(), torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        loss = model.loss(*model(*inputs))
    gc.collect()
    alive = {ptr: size for ref, ptr, size in made if not ref.expired() and ptr not in before}
    loss.backward()  # the graph was real: it still runs
    return sum(alive.values())
