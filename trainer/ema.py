"""An exponential moving average of the weights, in fp32, held in whatever parts of the parameters a rank owns.

The strategy decides what a rank's part is (``Strategy.ema_sources``): the whole parameter for a replica (single,
DDP), the local shard for FSDP, the fragment of DeepSpeed's partitioned fp32 master copy for ZeRO. This class only
averages: it never gathers, so under a sharded strategy the average costs a shard, not a replica.

After the n-th averaged update (n from 1) the average is ``ema ← d·ema + (1 − d)·w`` with ``d = decay``, or with
``train.ema.warmup`` ``d = min(decay, (1 + n) / (10 + n))`` (the warm-up of TensorFlow's ExponentialMovingAverage,
so that early weights, far from the final ones, are forgotten quickly). Until ``train.ema.start_step`` the average
is a copy of the weights. Only applied optimizer steps update it: a skipped (non-finite) step leaves it as it was.
"""

from __future__ import annotations

import sys
from typing import Mapping

import torch

from .config import Config, EMAConfig


def eval_weights(cfg: Config) -> str:
    """Which weights a run evaluates and samples: the average when it keeps one and ``eval.weights=ema``."""
    return "ema" if cfg.eval.weights == "ema" and cfg.train.ema.decay > 0 else "raw"


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor a rank holds: a DTensor's local shard (FSDP), else the tensor itself. Without importing
    torch.distributed.tensor, which only FSDP runs have imported."""
    module = sys.modules.get("torch.distributed.tensor")
    return tensor.to_local() if module is not None and isinstance(tensor, module.DTensor) else tensor


class WeightAverage:
    """fp32 averages of named tensors (each a rank's part of one parameter), updated in place."""

    def __init__(self, config: EMAConfig, sources: Mapping[str, torch.Tensor]):
        self.config = config
        self.averages = {name: t.detach().to(torch.float32, copy=True) for name, t in sources.items()}
        self.updates = 0  # averaged updates so far (steps past start_step that were applied)

    def decay(self, step: int) -> float:
        """The weight of the old average at optimizer step ``step`` (the step just applied): 0 copies the weights."""
        c = self.config
        if step <= c.start_step:
            return 0.0
        n = self.updates + 1
        return min(c.decay, (1 + n) / (10 + n)) if c.warmup else c.decay

    @torch.no_grad()
    def update(self, sources: Mapping[str, torch.Tensor], step: int) -> None:
        """After the optimizer applied step ``step``; ``sources`` are the same parts as at construction."""
        decay = self.decay(step)
        if step > self.config.start_step:
            self.updates += 1
        averages = [_local(a) for a in self.averages.values()]
        weights = [_local(sources[name]).float() for name in self.averages]
        if decay == 0.0:
            torch._foreach_copy_(averages, weights)
        else:
            torch._foreach_lerp_(averages, weights, 1.0 - decay)

    @torch.no_grad()
    def reset(self, sources: Mapping[str, torch.Tensor]) -> None:
        """Start again from the current weights (a checkpoint without an average: EMA switched on at resume)."""
        torch._foreach_copy_([_local(a) for a in self.averages.values()],
                             [_local(sources[name]).float() for name in self.averages])
        self.updates = 0

    def nbytes(self) -> int:
        """What this rank holds (the memory plan's EMA row)."""
        return sum(_local(a).numel() * _local(a).element_size() for a in self.averages.values())

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        return {"updates": self.updates, "averages": self.averages}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping, shown_as: str) -> None:
        """In place; every average must be there with its shape (``shown_as`` names the file in errors)."""
        saved = state["averages"]
        for name, average in self.averages.items():
            if name not in saved:
                raise KeyError(f"{shown_as}: the weight average has no entry {name!r}")
            value = saved[name]
            if tuple(value.shape) != tuple(average.shape):
                raise ValueError(f"{shown_as}: weight average {name!r} has shape {tuple(value.shape)}, this run's "
                                 f"{tuple(average.shape)}")
            average.copy_(value)
        self.updates = int(state["updates"])
