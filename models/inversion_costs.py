"""What a pass costs: the measurements behind ``method="auto"``.

A parallel (Jacobi) pass over n tokens costs about as much as one one-token decode step while the device is
latency-bound (small batches on a CPU; most batches on a GPU), and about n steps once it is compute-bound. So
whether Jacobi can beat the sequential sampler depends on the batch at hand, not on the model alone: ``auto``
times, once per batch shape and device, one decode step and one chunked pass of each size in a ladder 1, 2, 4, ...,
T-1 (as the frontier advances, passes get shorter), and keeps the result for the rest of the process. Timings vary
from run to run, so ``auto``'s choices (and with ``tol > 0`` its samples, within the tolerance) can differ between
processes; pass a ``CostModel`` explicitly (``TarFlow.reverse(..., costs=...)``) to pin the measurement.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

# Jacobi is worth trying on a block only if it could win with this many full passes or more: the blocks of trained
# models need 6-30 (digits T=16, photos T=64, measured: bench/sample.py).
MIN_BREAK_EVEN_PASSES = 4.0


@dataclass(frozen=True)
class CostModel:
    """Seconds (or any unit, consistently) for one one-token decode step (all rows, all layers) and for one
    chunked pass of ``sizes[i]`` tokens (``chunk[i]``), for one batch shape on one device."""

    step: float
    sizes: tuple[int, ...]
    chunk: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.sizes) != len(self.chunk) or not self.sizes or list(self.sizes) != sorted(self.sizes):
            raise ValueError(f"CostModel needs increasing sizes with one cost each, got sizes={self.sizes} "
                             f"chunk={self.chunk}")
        if not self.step > 0 or not all(c > 0 for c in self.chunk):
            raise ValueError(f"CostModel costs must be positive, got step={self.step} chunk={self.chunk}")

    def pass_cost(self, tokens: int) -> float:
        """The cost of a pass over ``tokens`` tokens: the smallest measured size that holds them (an upper bound;
        linear beyond the largest)."""
        for size, cost in zip(self.sizes, self.chunk):
            if tokens <= size:
                return cost
        return self.chunk[-1] * tokens / self.sizes[-1]

    @property
    def break_even_passes(self) -> float:
        """How many passes over the whole sequence cost as much as decoding it token by token."""
        return self.sizes[-1] * self.step / self.chunk[-1]

    @property
    def worth_iterating(self) -> bool:
        return self.break_even_passes >= MIN_BREAK_EVEN_PASSES


_MEASURED: dict[tuple, CostModel] = {}


def measured_costs(block, x: torch.Tensor, inputs, chunk_pass, repeats: int = 3) -> CostModel:
    """The cost model of ``block`` for the rows and dtype of ``x`` (block order) on its device, measured once per
    shape and kept. ``chunk_pass(start, end)`` runs one chunked pass over input tokens ``start..end-1``;
    ``inputs`` are the block's decode inputs (their KV cache is scratch and gets overwritten)."""
    rows = inputs.kv_cache.shape[2]
    T = x.shape[1]
    key = (x.device.type, x.device.index, x.dtype, torch.is_autocast_enabled(x.device.type), rows, T,
           tuple(inputs.kv_cache.shape), inputs.guidance_weights is not None, inputs.q_scale is not None,
           sum(p.numel() for p in block.parameters()))
    if key not in _MEASURED:
        _MEASURED[key] = _measure(block, x, inputs, chunk_pass, repeats)
    return _MEASURED[key]


def _measure(block, x: torch.Tensor, inputs, chunk_pass, repeats: int) -> CostModel:
    T = x.shape[1]
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)

    def best(fn) -> float:
        fn()  # warm-up (allocations, kernel selection)
        times = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return max(min(times), 1e-9)

    chunk_pass(0, T - 1)  # fill the cache with real values (uninitialised memory may hold slow denormals)
    scratch = x.clone()
    steps = min(4, T - 1)
    step = best(lambda: block.decode_from(scratch, T - 1 - steps, inputs.rows_bias, inputs.kv_cache,
                                          inputs.guidance_weights, inputs.q_scale)) / steps
    sizes = []
    n = 1
    while n < T - 1:
        sizes.append(n)
        n *= 2
    sizes.append(T - 1)
    chunk = tuple(best(lambda n=n: chunk_pass(T - 1 - n, T - 1)) for n in sizes)
    return CostModel(step, tuple(sizes), chunk)
