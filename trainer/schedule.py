"""Learning-rate schedules."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class WarmupCosine:
    """Linear warmup from ``min_lr`` to ``max_lr`` over ``warmup_steps``, then a half cosine down to ``min_lr`` at
    ``total_steps``. ``lr(n)`` is the rate for counter value n (n = 0 is the first optimizer step).

    After ``total_steps`` the rate stays at ``min_lr``. ``hold_floor=False`` reproduces the reference's
    ``CosineLRSchedule``, whose cosine rises again past the end (a bug when a run is resumed or extended).
    """

    warmup_steps: int
    total_steps: int
    max_lr: float
    min_lr: float = 0.0
    hold_floor: bool = True

    def __post_init__(self) -> None:
        if self.warmup_steps < 0 or self.total_steps <= self.warmup_steps:
            raise ValueError(f"need 0 <= warmup_steps < total_steps, got warmup_steps={self.warmup_steps}, "
                             f"total_steps={self.total_steps}")
        if not 0 <= self.min_lr <= self.max_lr:
            raise ValueError(f"need 0 <= min_lr <= max_lr, got min_lr={self.min_lr}, max_lr={self.max_lr}")

    def lr(self, n: int) -> float:
        span = self.max_lr - self.min_lr
        if n <= self.warmup_steps:
            return self.min_lr + span * (n / self.warmup_steps if self.warmup_steps else 1.0)
        t = (n - self.warmup_steps) / (self.total_steps - self.warmup_steps)
        if self.hold_floor:
            t = min(t, 1.0)
        return self.min_lr + 0.5 * (1.0 + math.cos(math.pi * t)) * span
