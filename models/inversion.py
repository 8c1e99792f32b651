"""Parallel inversion of a flow block: Jacobi and modular Gauss-Seidel-Jacobi (GS-Jacobi; Liu & Qin 2025,
arXiv:2505.12849), beside the exact sequential sampler ``FlowBlock.reverse``.

Sampling a block means solving the triangular system ``x_t = z_t·exp(a_t(x_<t)) + b_t(x_<t)`` (``x_t = z_t +
b_t(x_<t)`` for volume-preserving blocks), with x_0 = z_0, in the block's token order. The sequential sampler
solves it token by token. Jacobi updates every unfinished token at once from the current iterate; because token t
depends only on tokens < t, after k passes tokens 0..k are exactly what the sequential recursion gives (in exact
arithmetic), so T-1 passes always suffice, and a tolerance stops earlier. GS-Jacobi splits the tokens into
modules that are solved one after the other, Jacobi inside each.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable

import torch

from .flow_block import FlowBlock
from .inversion_costs import CostModel, measured_costs
from .transformer import at_least_fp32

METHODS = ("sequential", "jacobi", "gs-jacobi", "auto")
INITS = ("noise", "zeros")
# Starting from the block's own input latent z ("noise") is what a block close to the identity returns, and it
# never needed more Jacobi passes than zeros in our measurements (passes per block, last block first): on the
# golden model at tol 1e-3 / 1e-4 / 1e-5, noise [5,4,5,5] / [6,6,6,6] / [6,7,7,7] against zeros [5,6,6,6] /
# [6,6,6,7] / [7,7,7,8]; on a 4-block 8×8 model trained for 400 steps, at tol 1e-4, [15,14,15,8] against
# [15,15,15,9] (equal at 1e-3 and 1e-5). The IGM (models.convergence) prefers it too on both models except for
# one block of the trained one.
DEFAULT_INIT = "noise"
DEFAULT_TOL = 1e-4


@dataclass(frozen=True)
class InversionSettings:
    """How ``TarFlow.reverse`` inverts each block.

    ``method``: one of ``METHODS``, or one per block (indexed like ``model.blocks``, so a per-block choice such
    as an "auto" policy can be plugged in). ``tol``: a token is final once its largest change in a pass (over
    rows and features, in float32, finite rows only) is <= tol, and every token before it is final.
    ``max_iters``: passes per block (Jacobi) or per module (GS-Jacobi), ``None`` = T-1; a module that reaches
    it keeps its last iterate (tokens past the frontier are then the latest Jacobi values, or the initial
    iterate where the window never reached them), and ``BlockStats.capped`` says so. Since pass k makes token k
    exact, ``tol=0`` with ``max_iters`` >= the module length (T-1 for Jacobi) gives the sequential result, up to
    the rounding differences of the chunked and one-token kernels; with ``tol > 0`` tokens are frozen once they
    move by <= tol and are not refined further. ``window``: at most this many tokens after the frontier are
    updated per pass (``None`` = all remaining). ``module_size``: GS-Jacobi module length for tough blocks
    (``None`` = the whole sequence; 1 = the sequential recursion). ``tough_blocks``: block indices that get
    modules; ``None`` = every block. ``init``: the initial iterate, "noise" (the block's input latent z) or
    "zeros" (token 0 is z_0 either way), or one per block (e.g. ``models.calibrate(...).init``, the IGM's pick).

    ``"auto"`` chooses per block, for the batch at hand, between the sequential sampler and Jacobi, from measured
    costs (``models.inversion_costs``): sequential outright where a full pass costs too many one-token steps, else
    Jacobi that hands the rest of the block to the sequential sampler once it has spent more than decoding its
    finished tokens one by one would have, plus a margin; a block where Jacobi lost stays sequential for that
    batch shape. With ``tol=0`` its result is the sequential one (up to rounding).
    ``costs``: the ``CostModel`` it decides with; ``None`` = measured once per batch shape and device.
    """

    method: str | tuple[str, ...] = "sequential"
    tol: float = DEFAULT_TOL
    max_iters: int | None = None
    window: int | None = None
    module_size: int | None = None
    tough_blocks: frozenset[int] | None = None
    init: str | tuple[str, ...] = DEFAULT_INIT
    costs: CostModel | None = None

    def __post_init__(self) -> None:
        for name, choices in (("method", METHODS), ("init", INITS)):
            value = getattr(self, name)
            values = (value,) if isinstance(value, str) else value
            if isinstance(value, (list, tuple)):
                object.__setattr__(self, name, tuple(value))
            if not isinstance(values, (tuple, list)) or not values:
                raise ValueError(f"{name} must be a string or a non-empty sequence of strings, got {value!r}")
            for v in values:
                if v not in choices:
                    raise ValueError(f"unknown {name} {v!r}; choose one of {', '.join(map(repr, choices))}")
        if not isinstance(self.tol, (int, float)) or isinstance(self.tol, bool) or not self.tol >= 0:
            raise ValueError(f"tol must be a number >= 0 (0 = iterate until exact), got {self.tol!r}")
        for name in ("max_iters", "window", "module_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if self.tough_blocks is not None:
            try:
                tough = frozenset(self.tough_blocks)
            except TypeError:
                raise ValueError(f"tough_blocks must be a collection of block indices or None, "
                                 f"got {self.tough_blocks!r}") from None
            if not all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in tough):
                raise ValueError(f"tough_blocks must be block indices >= 0, got {sorted(self.tough_blocks)!r}")
            object.__setattr__(self, "tough_blocks", tough)
        if self.costs is not None and not isinstance(self.costs, CostModel):
            raise ValueError(f"costs must be a models.inversion_costs.CostModel or None, got {self.costs!r}")

    def check_blocks(self, num_blocks: int) -> None:
        """Per-block lists and tough block indices must fit the model."""
        for name in ("method", "init"):
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != num_blocks:
                raise ValueError(f"{name} has {len(value)} entries but the model has {num_blocks} blocks; "
                                 f"give one per block or a single string")
        if self.tough_blocks and max(self.tough_blocks) >= num_blocks:
            raise ValueError(f"tough_blocks {sorted(self.tough_blocks)} name blocks beyond the model's "
                             f"{num_blocks} (indices 0..{num_blocks - 1})")

    def method_for(self, k: int) -> str:
        return self.method if isinstance(self.method, str) else self.method[k]

    def init_for(self, k: int) -> str:
        return self.init if isinstance(self.init, str) else self.init[k]


@dataclass(frozen=True)
class BlockStats:
    """What inverting one block cost. ``passes``: parallel passes (sequential: T-1 one-token steps);
    ``token_evals``: tokens pushed through the transformer, summed over passes (sequential: T-1); ``capped``:
    some module stopped at ``max_iters`` before every token met ``tol`` (the result is then the last iterate).
    ``method`` is what ran: "auto" reports "sequential", "jacobi" or "jacobi+sequential" (handed over mid-block,
    ``passes`` then counts the Jacobi passes plus the one-token steps)."""

    block: int
    method: str
    passes: int
    token_evals: int
    capped: bool = False
    cost: float | None = None  # "auto": the cost model's estimate of what the block took (its units)


@dataclass(frozen=True)
class _BlockInputs:
    """Everything one block inversion needs beside the block itself (see ``FlowBlock.reverse``)."""

    rows_bias: torch.Tensor
    kv_cache: torch.Tensor
    guidance_weights: torch.Tensor | None
    q_scale: torch.Tensor | None


def _sequential(block: FlowBlock, z: torch.Tensor, inputs: _BlockInputs, settings: InversionSettings,
                k: int) -> tuple[torch.Tensor, BlockStats]:
    T = z.shape[1]
    x = block.reverse(z, inputs.rows_bias, inputs.kv_cache, inputs.guidance_weights, inputs.q_scale)
    return x, BlockStats(k, "sequential", T - 1, T - 1)


def _jacobi(block: FlowBlock, z: torch.Tensor, inputs: _BlockInputs, settings: InversionSettings,
            k: int) -> tuple[torch.Tensor, BlockStats]:
    return _modular_jacobi(block, z, inputs, settings, k, "jacobi", module_size=None)


def _gs_jacobi(block: FlowBlock, z: torch.Tensor, inputs: _BlockInputs, settings: InversionSettings,
               k: int) -> tuple[torch.Tensor, BlockStats]:
    tough = settings.tough_blocks is None or k in settings.tough_blocks
    return _modular_jacobi(block, z, inputs, settings, k, "gs-jacobi",
                           module_size=settings.module_size if tough else None)


# What Jacobi cost on a block last time, relative to the sequential sampler, per batch shape and settings
# (``method="auto"``): the block → {key: ratio}. Weak keys: a model that goes away takes its history with it.
_HISTORY: "weakref.WeakKeyDictionary[FlowBlock, dict[tuple, float]]" = weakref.WeakKeyDictionary()
PROBE_SLACK = 1.0   # a block's first Jacobi run may cost up to (1 + this) × sequential before it hands over
KNOWN_SLACK = 0.25  # once Jacobi has been the cheaper one on a block, the margin for an unlucky batch


def _auto(block: FlowBlock, z: torch.Tensor, inputs: _BlockInputs, settings: InversionSettings,
          k: int) -> tuple[torch.Tensor, BlockStats]:
    """Sequential where Jacobi could only win with fewer passes than blocks need (compute-bound); else Jacobi, unless
    it cost more than sequential the last time on this block with this batch shape and these settings. Jacobi's
    progress is uneven (a slow start, then many tokens at once), so the first run may overspend by
    ``PROBE_SLACK`` before it hands over; later runs by ``KNOWN_SLACK``."""
    x = block.permute(z)
    costs = settings.costs or measured_costs(
        block, x, inputs, lambda start, end: _affine_chunk(block, x, start, end, inputs, start + 1))
    T = z.shape[1]
    w = inputs.guidance_weights
    key = (inputs.kv_cache.shape[2], T, settings.tol, settings.max_iters, settings.window, settings.init_for(k),
           None if w is None else float(w.sum()), inputs.q_scale is not None, costs)
    seen = _HISTORY.setdefault(block, {})
    if not costs.worth_iterating or seen.get(key, 0.0) >= 1.0:
        return _sequential(block, z, inputs, settings, k)
    sequential = (T - 1) * costs.step
    slack = (PROBE_SLACK if key not in seen else KNOWN_SLACK) * sequential
    x, stats = _modular_jacobi(block, z, inputs, settings, k, "jacobi", module_size=None,
                               guard=(costs, slack))
    seen[key] = float("inf") if stats.method != "jacobi" else stats.cost / sequential
    return x, stats


Inverter = Callable[[FlowBlock, torch.Tensor, _BlockInputs, InversionSettings, int],
                    tuple[torch.Tensor, BlockStats]]
# The dispatch table: a new method is one entry here and one name in METHODS.
INVERTERS: dict[str, Inverter] = {"sequential": _sequential, "jacobi": _jacobi, "gs-jacobi": _gs_jacobi,
                                  "auto": _auto}


def invert_block(block: FlowBlock, k: int, z: torch.Tensor, rows_bias: torch.Tensor, kv_cache: torch.Tensor,
                 guidance_weights: torch.Tensor | None, q_scale: torch.Tensor | None,
                 settings: InversionSettings) -> tuple[torch.Tensor, BlockStats]:
    """Invert block ``k`` (its index in ``model.blocks``) with the method ``settings`` chooses for it.
    Arguments as ``FlowBlock.reverse``; returns the block's input in original order and its cost."""
    inputs = _BlockInputs(rows_bias, kv_cache, guidance_weights, q_scale)
    return INVERTERS[settings.method_for(k)](block, z, inputs, settings, k)


def _initial_iterate(z: torch.Tensor, init: str) -> torch.Tensor:
    """In block order; token 0 is exact from the start (x_0 = z_0)."""
    x = z.clone()
    if init == "zeros":
        x[:, 1:] = 0
    return x


def _affine_chunk(block: FlowBlock, x: torch.Tensor, start: int, end: int, inputs: _BlockInputs,
                  first_out: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(a, b) for tokens ``first_out..end`` from input tokens ``start..end-1`` of ``x``, whose keys and values
    are written into cache slots ``start..end-1`` (slots < start must hold tokens < start)."""
    B = x.shape[0]
    G = inputs.rows_bias.shape[0]
    h = block.proj_in(x[:, start:end]) + inputs.rows_bias[:, :, start:end]  # (G, B, n, C)
    h = h.reshape(G * B, end - start, -1)
    for layer_idx, layer in enumerate(block.attn_blocks):
        h = layer.decode_chunk(h, inputs.kv_cache[layer_idx], start, inputs.q_scale)
    o = block.proj_out(h[:, first_out - 1 - start:])  # output at input position p parameterises token p+1
    w = inputs.guidance_weights
    if w is not None:
        # As the sequential sampler: lerp(u, c, 1 + g) = c + g·(c − u), conditional rows first.
        o = torch.lerp(o[B:], o[:B], w[first_out - 1:end].to(o.dtype))
    return block._split(o)


def _modular_jacobi(block: FlowBlock, z_in: torch.Tensor, inputs: _BlockInputs, settings: InversionSettings,
                    k: int, method: str, module_size: int | None,
                    guard: tuple[CostModel, float] | None = None) -> tuple[torch.Tensor, BlockStats]:
    """Jacobi over modules of ``module_size`` tokens (None: one module of all tokens), solved in order.

    State: tokens < ``s`` (the frontier) are final; cache slots < ``cached`` hold final tokens' keys and values.
    A pass recomputes input tokens ``cached..e-2`` and updates tokens ``s..e-1`` (``e``: at most ``window``
    tokens past the frontier, never past the module). Token s is then exact, and so final, and every following
    token whose change was <= tol becomes final too. Those tokens' cache slots were written from their values
    before this update, so they are stale: ``cached`` only advances to the old frontier, and the next pass
    starts there (recomputing them without updating them). When a module reaches ``max_iters`` passes its
    current iterate is accepted as final.

    ``guard`` (costs, slack): hand the rest of the block to the sequential sampler once the passes have cost more
    than decoding the finished tokens one by one would have, plus ``slack`` (``method="auto"``).
    """
    z = block.permute(z_in)
    B, T, _ = z.shape
    x = _initial_iterate(z, settings.init_for(k))
    _bound_(x[:, 1:])
    span = T - 1 if module_size is None else module_size
    window = settings.window or T
    cap = T - 1 if settings.max_iters is None else settings.max_iters
    s, cached = 1, 0
    module_end, module_passes = min(1 + span, T), 0
    passes = token_evals = 0
    capped = False
    spent = 0.0
    doomed = torch.zeros(B, dtype=torch.bool, device=z.device)  # rows non-finite at a final token
    while s < T:
        if guard is not None and spent > (s - 1) * guard[0].step + guard[1]:
            return _finish_sequentially(block, x, z, s, cached, inputs, k, passes, token_evals,
                                        spent + (T - s) * guard[0].step)
        if module_passes >= cap:  # the cap: accept the module's current iterate and move on
            capped = True
            s = module_end
        else:
            e = min(s + window, module_end)
            a, b = _affine_chunk(block, x, cached, e - 1, inputs, s)
            z_t = z[:, s:e]
            if a is None:
                new = z_t + b
            else:
                new = torch.addcmul(b, z_t, torch.exp(at_least_fp32(a)).to(a.dtype))
            # token s is exact: a row non-finite there is non-finite in the sequential result too
            doomed |= ~torch.isfinite(new[:, 0]).all(dim=-1)
            change = _token_change(new, x[:, s:e], doomed)
            x[:, s:e] = new
            passes += 1
            module_passes += 1
            token_evals += e - 1 - cached
            if guard is not None:
                spent += guard[0].pass_cost(e - 1 - cached)
            cached = s
            # token s is exact (its inputs were final); then the prefix of changes <= tol (NaN counts as > tol)
            over = ~(change[1:] <= settings.tol)
            if over.numel():
                s += int(torch.where(over.any(), over.int().argmax(), over.numel()))  # one host sync a pass
            s += 1
            if s < e:
                _bound_(x[:, s:e])
        if s >= module_end:
            module_end, module_passes = min(s + span, T), 0
    return block.permute(x), BlockStats(k, method, passes, token_evals, capped, spent if guard else None)


def _finish_sequentially(block: FlowBlock, x: torch.Tensor, z: torch.Tensor, s: int, cached: int,
                         inputs: _BlockInputs, k: int, passes: int, token_evals: int,
                         cost: float) -> tuple[torch.Tensor, BlockStats]:
    """Tokens >= s by the sequential sampler, from a Jacobi state (tokens < s final, cache slots < cached valid)."""
    T = x.shape[1]
    if cached < s - 1:  # the slots of tokens frozen in the last pass were written from their values before it
        _affine_chunk(block, x, cached, s - 1, inputs, s - 1)
    x[:, s:] = z[:, s:]  # the sequential recursion starts from the latent
    block.decode_from(x, s - 1, inputs.rows_bias, inputs.kv_cache, inputs.guidance_weights, inputs.q_scale)
    steps = T - s
    return block.permute(x), BlockStats(k, "jacobi+sequential", passes + steps, token_evals + steps, cost=cost)


# Tokens that are not final yet are guesses; one that overflows (a ≈ 57 on a trained model's first passes) would
# reach the final tokens through the attention (0 · inf = NaN at a masked position) and their LayerNorm. Bounding
# the guesses changes no final token: those are computed from final tokens only.
ITERATE_BOUND = 1e6


def _bound_(guesses: torch.Tensor) -> None:
    """In place: non-final iterate values finite and within ±ITERATE_BOUND."""
    torch.nan_to_num(guesses, nan=0.0, posinf=ITERATE_BOUND, neginf=-ITERATE_BOUND, out=guesses)
    guesses.clamp_(-ITERATE_BOUND, ITERATE_BOUND)


def _token_change(new: torch.Tensor, old: torch.Tensor, doomed: torch.Tensor) -> torch.Tensor:
    """Largest |new − old| per token over rows and features, in float32 (at least), (n,). ``doomed`` rows (non-finite
    at a final token, as they are with the sequential sampler; the caller redraws them) are left out, so that one
    overflowing sample does not hold back the others. A non-finite guess of any other row gives NaN: not converged."""
    delta = (at_least_fp32(new) - at_least_fp32(old)).abs()
    # a masked where, not boolean indexing: no host sync
    return torch.where(doomed[:, None, None], 0, delta).amax(dim=(0, 2))
