"""The interface between the training loop and a way of placing and updating the model."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from models import TarFlow

from ..config import EMAConfig, OptimConfig
from ..ema import WeightAverage


@dataclass
class StepResult:
    grad_norm: float  # global norm before clipping
    applied: bool     # False: loss or gradients were not finite and the update was skipped


class Strategy(ABC):
    name: str  # what train.strategy calls it (the registry in strategies/__init__.py is built from these)
    distributed: bool = True  # one process per device, launched by torchrun or the deepspeed launcher

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

    def inference(self, weights: str = "raw") -> contextlib.AbstractContextManager[TarFlow]:
        """Context yielding a model that can run every entry point (``reverse``, ``denoise``), not only forward,
        with the trained weights (``raw``) or the weight average (``ema``). All ranks enter it together."""
        return self._weights_in_place(weights)

    def evaluating(self, weights: str = "raw") -> contextlib.AbstractContextManager[TarFlow]:
        """Context yielding a model for forward passes only (held-out bits/dim), with those weights; sharded
        strategies keep their parameters sharded (``inference`` gathers them)."""
        return self._weights_in_place(weights)

    # ---------------------------------------------------------------- the weight average (train.ema)
    ema: WeightAverage | None = None

    def attach_ema(self, config: EMAConfig) -> None:
        """After ``setup``: keep an fp32 average of the weights, in the parts of them this rank holds."""
        self.ema = WeightAverage(config, self.ema_sources())

    def ema_sources(self) -> dict[str, torch.Tensor]:
        """This rank's fp32 part of each parameter, by name: the whole parameter for a replica (DDP), the local shard
        of a sharded one (FSDP's DTensors); DeepSpeed's are fragments of its fp32 master partition."""
        return dict(self.unwrapped.named_parameters())

    def update_ema(self, step: int) -> None:
        """After an applied optimizer step (a skipped one must not call it)."""
        if self.ema is not None:
            self.ema.update(self.ema_sources(), step)

    def full_ema_state_dict(self) -> dict[str, torch.Tensor]:
        """``full_model_state_dict`` with the averaged weights (buffers as the model has them). Collective."""
        with self._weights_in_place("ema"):  # copied out: a replica's state dict holds views of the parameters
            return {k: v.detach().clone() for k, v in self.full_model_state_dict().items()}

    @contextlib.contextmanager
    def _weights_in_place(self, weights: str):
        """The model, with the average copied into its parameters for the duration (``ema``) and the trained
        weights put back, bit for bit, afterwards: one extra copy of this rank's part, never a gathered replica."""
        if weights == "raw" or self.ema is None:
            yield self.unwrapped
            return
        params = dict(self.unwrapped.named_parameters())
        with torch.no_grad():
            trained = {name: p.detach().clone() for name, p in params.items()}
            for name, average in self.ema.averages.items():
                params[name].copy_(average)
        try:
            yield self.unwrapped
        finally:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(trained[name])

    @property
    def replicated(self) -> bool:
        """Every rank holds the whole model (one rank can sample alone)."""
        return True

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    @abstractmethod
    def step(self, lr: float, max_grad_norm: float, loss_is_finite: torch.Tensor) -> StepResult:
        """Clip, and update unless the loss or the gradients are not finite; then clear gradients."""

    def full_model_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's fp32 state dict (export, evaluation in one process). Collective: every rank calls it;
        rank 0 receives the full state (sharded strategies may give the others an empty one)."""
        return self.unwrapped.state_dict()

    # ---------------------------------------------------------------- checkpoints (each strategy its own format)
    checkpoint_format: str = "torch"  # checkpoints of the same format load into one another

    def can_resume(self, manifest, world_size: int) -> str | None:
        """None when this strategy can load the checkpoint ``manifest`` describes on ``world_size`` ranks, else why
        not (the end of a sentence that begins "the checkpoint at step N in WHERE")."""
        if manifest.checkpoint_format != self.checkpoint_format:
            return (f"was written by train.strategy={manifest.strategy} ({manifest.checkpoint_format} format), "
                    f"which train.strategy={self.name} cannot resume; resume with train.strategy={manifest.strategy}")
        return None

    @abstractmethod
    def save_state(self, directory: Path) -> None:
        """Collective: write this rank's part of the model and optimizer state as files under ``directory`` (a
        local, per-rank staging directory; the union of all ranks' files is the checkpoint)."""

    @abstractmethod
    def load_state(self, directory: Path) -> None:
        """Collective: restore model and optimizer from a local directory holding the whole checkpoint."""

    @classmethod
    @abstractmethod
    def export_model_state(cls, directory: Path, weights: str = "raw") -> dict[str, torch.Tensor] | None:
        """The whole model's fp32 state dict from a checkpoint directory of this format, in one process: the trained
        weights (``raw``) or the weight average (``ema``; None when the checkpoint holds none)."""
