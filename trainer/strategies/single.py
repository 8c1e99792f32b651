"""One process, one device: the reference for every other strategy."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from models import TarFlow

from ..checkpoint.files import load_torch_file
from ..config import OptimConfig
from ..optim import build_optimizer
from .base import StepResult, Strategy


class SingleDevice(Strategy):
    """One process, one device."""

    name = "single"
    distributed = False

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
        if _is_dtensor(norm):  # sharded gradients: the norm is already over all shards
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

    # One file, written by rank 0 (every rank holds the same replica); loads into any number of ranks.
    FILE = "model_optimizer.pt"

    def save_state(self, directory: Path) -> None:
        if not dist.is_initialized() or dist.get_rank() == 0:
            state = {"model": self._module.state_dict(), "optimizer": self.optimizer.state_dict()}
            if self.ema is not None:
                state["ema"] = self.ema.state_dict()
            torch.save(state, directory / self.FILE)

    def load_state(self, directory: Path) -> None:
        state = load_torch_file(directory / self.FILE, map_location=self.device)
        self._module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None:
            if "ema" in state:
                self.ema.load_state_dict(state["ema"], shown_as=str(directory / self.FILE))
            else:  # written without an average (train.ema switched on at this resume): it starts from here
                self.ema.reset(self.ema_sources())

    @classmethod
    def export_model_state(cls, directory: Path, weights: str = "raw") -> dict[str, torch.Tensor] | None:
        state = load_torch_file(directory / cls.FILE)
        return with_weights(state["model"], state.get("ema"), weights)


def with_weights(model: dict[str, torch.Tensor], ema: dict | None, weights: str) -> dict[str, torch.Tensor] | None:
    """A full model state dict: as trained (``raw``), or with the averaged parameters of a saved ``WeightAverage``
    state over it (``ema``; None when there is none)."""
    if weights == "raw":
        return model
    if not ema:
        return None
    return {**model, **{name: value.detach().cpu() for name, value in ema["averages"].items()}}


def _is_dtensor(tensor: torch.Tensor) -> bool:
    """Without importing torch.distributed.tensor (seconds per process, for every single and DDP run): a DTensor
    exists only once its module has been imported (by FSDP)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)
