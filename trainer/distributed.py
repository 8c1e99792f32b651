"""The process group and the few collectives the loop needs. With one process every function is a no-op."""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from cluster.env import ProcessEnv


@contextlib.contextmanager
def _exported(variables: dict[str, str]):
    """Set the unset ones of ``variables`` in os.environ for the duration; restore on the way out."""
    added = {k: v for k, v in variables.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


@contextlib.contextmanager
def process_group(env: ProcessEnv, device: torch.device):
    """NCCL on CUDA, gloo on CPU. Rendezvous: torchrun's variables (env://), or, for a task started directly by
    srun or as an Indexed Job pod, the discovered master (tcp://), with torchrun's rank variables exported for the
    libraries that read them (mosaicml-streaming). Torn down on the way out."""
    created = False
    with _exported(env.launcher_variables()):
        if env.scheduler != "none" and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", init_method=env.init_method,
                                    rank=env.rank, world_size=env.world_size, timeout=timedelta(minutes=30))
            created = True
        try:
            yield
            if created:  # all finished normally: leave together, or a fast rank's teardown aborts a slow one's I/O
                dist.barrier()
        finally:
            if created:
                dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum over ranks, in float64."""
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_ranks_true(flag: torch.Tensor) -> torch.Tensor:
    """A bool tensor that is True only if it is True on every rank (so that all ranks skip a step together)."""
    if not active():
        return flag
    t = flag.to(torch.int32).reshape(1)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t[0].bool()


def gather_objects(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if active():
        dist.barrier()
