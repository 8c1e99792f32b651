"""Timing helpers for benchmarks on a shared machine."""

from __future__ import annotations

import time
from typing import Callable, Sequence


def interleaved_best(fns: Sequence[Callable[[], object]], repeats: int) -> list[float]:
    """Best wall time of each function over ``repeats`` rounds, the functions alternating within a round, so that
    background load hits all of them alike; the minimum is the least disturbed run. One warm-up round first."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best
