"""Timing helpers for benchmarks on a shared machine."""

from __future__ import annotations

import argparse
import time
from typing import Callable, Sequence


def interleaved_best(fns: Sequence[Callable[[], object]], repeats: int) -> list[float]:
    """Best wall time of each function over ``repeats`` rounds, the functions alternating within a round, so that
    background load hits all of them alike; the minimum is the least disturbed run. One warm-up round first."""
    return interleaved_rounds(fns, repeats)[0]


def interleaved_rounds(fns: Sequence[Callable[[], object]], repeats: int,
                       budget_s: float | None = None) -> tuple[list[float], int]:
    """``interleaved_best``, with the number of timed rounds cut to fit ``budget_s`` seconds as estimated from the
    warm-up round (at least one). Returns (best seconds per function, rounds timed)."""
    start = time.perf_counter()
    for fn in fns:
        fn()
    warm = time.perf_counter() - start
    rounds = repeats if budget_s is None else max(1, min(repeats, int(budget_s / max(warm, 1e-9))))
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best, rounds


def cpu_benchmark_args(doc: str, repeats: int, **extra: float) -> argparse.Namespace:
    """The flags every in-process CPU benchmark takes (threads, repeats, cases, plus ``extra`` float flags), parsed,
    with the thread count applied; prints the header line that says how the numbers were taken."""
    import torch

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--cases", default="A,B")
    for name, default in extra.items():
        parser.add_argument(f"--{name}", type=float, default=default)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, float32 CPU, best of {args.repeats} interleaved runs")
    return args
