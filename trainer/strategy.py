"""How the model is placed and updated. The loop talks to one small interface; each way of distributing training
(single device here; DDP, FSDP2 and DeepSpeed later) is one class behind it, chosen by ``train.strategy``."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from models import TarFlow

from .config import FSDPConfig, OptimConfig
from .distributed import all_ranks_true
from .optim import build_optimizer


@dataclass
class StepResult:
    grad_norm: float  # global norm before clipping
    applied: bool     # False: loss or gradients were not finite and the update was skipped


class Strategy(ABC):
    @abstractmethod
    def setup(self, model: TarFlow, optim: OptimConfig) -> None:
        """Place and wrap the model and build its optimizer."""

    @property
    @abstractmethod
    def model(self) -> nn.Module:
        """The module to call for training forward passes."""

    @property
    @abstractmethod
    def unwrapped(self) -> TarFlow:
        """The plain TarFlow (evaluation, sampling, export)."""

    def accumulating(self) -> contextlib.AbstractContextManager:
        """Context for micro-batches whose gradients are not yet reduced (all but the last of a step)."""
        return contextlib.nullcontext()

    def inference(self) -> contextlib.AbstractContextManager:
        """Context in which ``unwrapped`` can run every entry point (``reverse``, ``denoise``), not only forward.
        All ranks enter it together."""
        return contextlib.nullcontext()

    @property
    def replicated(self) -> bool:
        """Every rank holds the whole model (one rank can sample alone)."""
        return True

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    @abstractmethod
    def step(self, lr: float, max_grad_norm: float, loss_is_finite: torch.Tensor) -> StepResult:
        """Clip, and update unless the loss or the gradients are not finite; then clear gradients."""

    @abstractmethod
    def state_dict(self) -> dict: ...

    @abstractmethod
    def load_state_dict(self, state: dict) -> None: ...


class SingleDevice(Strategy):
    """One process, one device."""

    def __init__(self, device: torch.device):
        self.device = device

    def setup(self, model: TarFlow, optim: OptimConfig) -> None:
        self._module = model.to(self.device)
        self._wrapped: nn.Module = self._module
        self.optimizer = build_optimizer(self._module, optim)

    @property
    def model(self) -> nn.Module:
        return self._wrapped

    @property
    def unwrapped(self) -> TarFlow:
        return self._module

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, lr: float, max_grad_norm: float, loss_is_finite: torch.Tensor) -> StepResult:
        params = [p for p in self._module.parameters() if p.grad is not None]
        if max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if isinstance(norm, DTensor):  # sharded gradients: the norm is already over all shards
            norm = norm.full_tensor()
        # One host sync per step: the decision to skip must be taken before the optimizer touches its state, and
        # (data-parallel) by every rank alike: a NaN loss on one rank skips the step everywhere.
        finite = bool(self._on_all_ranks(torch.logical_and(loss_is_finite, torch.isfinite(norm))))
        if finite:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(grad_norm=float(norm), applied=finite)

    def _on_all_ranks(self, flag: torch.Tensor) -> torch.Tensor:
        return flag

    def state_dict(self) -> dict:
        return {"model": self._module.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self._module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


class DistributedDataParallel(SingleDevice):
    """A full replica per rank; gradients all-reduced in buckets during backward (DDP). Gradients of all but the
    last micro-batch of a step stay local (``no_sync``). Checkpoints hold the plain module's state."""

    # 25 MB buckets overlap communication with backward for models of this size; views avoid a gradient copy.
    BUCKET_CAP_MB = 25

    def setup(self, model: TarFlow, optim: OptimConfig) -> None:
        super().setup(model, optim)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self._wrapped = torch.nn.parallel.DistributedDataParallel(
            self._module, device_ids=device_ids, bucket_cap_mb=self.BUCKET_CAP_MB, gradient_as_bucket_view=True)

    def accumulating(self) -> contextlib.AbstractContextManager:
        return self._wrapped.no_sync()

    def _on_all_ranks(self, flag: torch.Tensor) -> torch.Tensor:
        return all_ranks_true(flag)


class FullyShardedDataParallel(SingleDevice):
    """FSDP2 (``fully_shard``): parameters, gradients and optimizer state sharded over the ranks, each transformer
    layer (``fsdp.unit=layer``) or flow block (``block``) one unit gathered for its forward and backward, the rest
    in the root unit; ``fsdp.hybrid`` shards within a node and replicates across nodes.

    Mixed precision: with bf16 autocast the units compute in bf16 and reduce gradients in fp32 (log-likelihood
    training is sensitive to low-precision reductions). Checkpoints hold full (unsharded) state dicts, gathered to
    rank 0, so they load into any strategy and world size; sharded ``torch.distributed.checkpoint`` comes with the
    checkpoint store. ``reverse`` and ``denoise`` run inside ``inference()``: every unit is gathered once for the
    duration instead of once per decoded token.
    """

    def __init__(self, device: torch.device, compute_dtype: torch.dtype | None = None,
                 options: FSDPConfig | None = None, nodes: int = 1):
        super().__init__(device)
        self.compute_dtype = compute_dtype
        self.options = options or FSDPConfig()
        self.nodes = nodes

    def setup(self, model: TarFlow, optim: OptimConfig) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        o = self.options
        model = model.to(self.device)
        reduce_dtype = torch.bfloat16 if o.reduce_dtype == "bf16" else torch.float32
        policy = MixedPrecisionPolicy(param_dtype=self.compute_dtype, reduce_dtype=reduce_dtype) \
            if self.compute_dtype is not None else MixedPrecisionPolicy(reduce_dtype=reduce_dtype)
        mesh = None
        if o.hybrid:  # (replicate over nodes, shard within a node): HSDP
            world = torch.distributed.get_world_size()
            if world % self.nodes:
                raise ValueError(f"fsdp.hybrid needs the same number of ranks on every node: {world} ranks, "
                                 f"{self.nodes} nodes")
            mesh = init_device_mesh(self.device.type, (self.nodes, world // self.nodes),
                                    mesh_dim_names=("replicate", "shard"))
        kwargs = dict(mesh=mesh, mp_policy=policy, reshard_after_forward=o.reshard_after_forward,
                      offload_policy=CPUOffloadPolicy() if o.cpu_offload else OffloadPolicy())
        units = [layer for block in model.blocks for layer in block.attn_blocks] if o.unit == "layer" \
            else list(model.blocks)
        for unit in units:
            fully_shard(unit, **kwargs)
        fully_shard(model, **kwargs)
        self._module = self._wrapped = model
        self.optimizer = build_optimizer(model, optim)

    @property
    def replicated(self) -> bool:
        return False

    def _units(self) -> list[nn.Module]:
        return [m for m in self._module.modules() if hasattr(m, "unshard") and hasattr(m, "reshard")]

    @contextlib.contextmanager
    def accumulating(self):
        self._module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self._module.set_requires_gradient_sync(True)

    @contextlib.contextmanager
    def inference(self):
        units = self._units()
        for unit in units:  # denoise runs a backward: keep the units gathered through it as well
            unit.set_reshard_after_forward(False)
            unit.set_reshard_after_backward(False)
            unit.unshard()
        try:
            yield
        finally:
            for unit in units:
                unit.reshard()
                unit.set_reshard_after_forward(self.options.reshard_after_forward)  # as set up (root included)
                unit.set_reshard_after_backward(True)

    def _on_all_ranks(self, flag: torch.Tensor) -> torch.Tensor:
        return all_ranks_true(flag)

    def _options(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions
        return StateDictOptions(full_state_dict=True, cpu_offload=True)

    def state_dict(self) -> dict:
        """Collective: every rank calls it; rank 0 receives the full state (the others an empty one)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
        return {"model": get_model_state_dict(self._module, options=self._options()),
                "optimizer": get_optimizer_state_dict(self._module, self.optimizer, options=self._options())}

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)
        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self._module, state["model"], options=options)
        set_optimizer_state_dict(self._module, self.optimizer, state["optimizer"], options=options)


STRATEGIES = {"single": SingleDevice, "ddp": DistributedDataParallel, "fsdp": FullyShardedDataParallel}
DISTRIBUTED = {"ddp", "fsdp"}  # strategies that need a process group (torchrun)


def build_strategy(name: str, device: torch.device, compute_dtype: torch.dtype | None = None,
                   fsdp: FSDPConfig | None = None, nodes: int = 1) -> Strategy:
    if name not in STRATEGIES:
        raise ValueError(f"train.strategy={name!r} is not one of {sorted(STRATEGIES)}")
    if name == "fsdp":
        return FullyShardedDataParallel(device, compute_dtype, fsdp, nodes)
    return STRATEGIES[name](device)
