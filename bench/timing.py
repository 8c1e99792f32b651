"""Timing helpers for benchmarks on a shared machine."""

from __future__ import annotations

import argparse
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
