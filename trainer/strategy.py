"""How the model is placed and updated. The loop talks to one small interface; each way of distributing training
(single device here; DDP, FSDP2 and DeepSpeed later) is one class behind it, chosen by ``train.strategy``."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from models import TarFlow

from .config import OptimConfig
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


STRATEGIES = {"single": SingleDevice, "ddp": DistributedDataParallel}
DISTRIBUTED = {"ddp"}  # strategies that need a process group (torchrun)


def build_strategy(name: str, device: torch.device) -> Strategy:
    if name not in STRATEGIES:
        raise ValueError(f"train.strategy={name!r} is not one of {sorted(STRATEGIES)}")
    return STRATEGIES[name](device)
