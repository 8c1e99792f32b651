"""One process, one device: the reference for every other strategy."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from models import TarFlow

from ..config import OptimConfig
from ..optim import build_optimizer
from .base import StepResult, Strategy


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
