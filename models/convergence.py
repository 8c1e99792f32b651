"""Which blocks are hard to invert in parallel, and which initial iterate suits each: the Convergence Ranking
Metric (CRM) and Initial Guessing Metric (IGM) of GS-Jacobi sampling (Liu & Qin 2025, arXiv:2505.12849),
measured on a few forward passes.

Both use the Jacobi map of a block, F(x)_t = z_t·exp(a_t(x_<t)) + b_t(x_<t), whose fixed point is the block's
input x* when z is its output; a forward pass of data gives such (x*, z) pairs without any sampling. Only the
paper's abstract was at hand when this was written, so the two metrics follow its description (CRM: does a
block converge in few Jacobi iterations or many; IGM: how good is an initial value) with formulas of our own:

- CRM = ‖F(x* + δ) − F(x*)‖ / ‖δ‖ for a small random δ (token 0 unperturbed): the factor by which one Jacobi pass
  shrinks or grows an error near the solution. Blocks close to the identity score ≈ 0 and converge in a pass
  or two; a large score means many passes.
- IGM(init) = ‖F(x₀) − x*‖ / ‖x*‖ for the initial iterate x₀ of each choice in ``INITS``: the error left after the
  first pass (inf where it overflows), so a choice that sends exp(a) out of range scores badly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .inversion import INITS, _initial_iterate
from .transformer import at_least_fp32


@dataclass(frozen=True)
class Calibration:
    """Per-block scores, indexed like ``model.blocks``; ``tough_blocks`` and ``init`` plug into
    ``TarFlow.reverse(method="gs-jacobi", tough_blocks=..., init=...)``."""

    crm: tuple[float, ...]
    igm: dict[str, tuple[float, ...]]
    tough_blocks: frozenset[int]
    init: tuple[str, ...]


def _jacobi_map(block, x: torch.Tensor, z: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
    a, b = block.affine_params(x, cond)
    return z + b if a is None else z * torch.exp(at_least_fp32(a)).to(a.dtype) + b


def _relative(num: torch.Tensor, den: torch.Tensor) -> float:
    value = float(at_least_fp32(num).norm() / at_least_fp32(den).norm().clamp_min(1e-30))
    return value if value == value else float("inf")  # NaN (overflow) counts as worst


@torch.no_grad()
def calibrate(model, x: torch.Tensor, y: torch.Tensor | None = None, *, dominance: float = 2.0,
              num_tough: int | None = None, perturbation: float = 1e-3, seed: int = 0) -> Calibration:
    """CRM and IGM of every block of ``model`` (a ``TarFlow``) on images ``x`` (B, C, S, S) with labels ``y``.

    Tough blocks: the ``num_tough`` highest CRMs when given, else every block whose CRM exceeds ``dominance``
    times the smallest (the easiest block is the yardstick: on a 400-step trained 4-block model the two blocks
    that needed all 15 Jacobi passes scored 0.82 and 0.86 against 0.39 and 0.44 for those that needed 7 and 11;
    on the near-identity golden model all four score 0.086–0.098 and none is tough). ``perturbation`` is δ's
    size relative to the RMS of x*. A handful of images suffices: the metrics are ratios of norms over the batch.
    They describe the unguided map; guidance changes a and b, and so, somewhat, how hard a block is."""
    if not dominance > 0:
        raise ValueError(f"dominance must be positive, got {dominance!r}")
    if num_tough is not None and (not isinstance(num_tough, int) or not 0 <= num_tough <= len(model.blocks)):
        raise ValueError(f"num_tough must be an integer in [0, {len(model.blocks)}] or None, got {num_tough!r}")
    if not perturbation > 0:
        raise ValueError(f"perturbation must be positive, got {perturbation!r}")
    _, _, outputs = model(x, y, return_outputs=True)
    inputs = [model.patchify(x)] + outputs[:-1]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    crm: list[float] = []
    igm: dict[str, list[float]] = {init: [] for init in INITS}
    for block, x_in, z_out in zip(model.blocks, inputs, outputs):
        x_star, z = block.permute(x_in), block.permute(z_out)
        cond = block.class_condition(y)
        delta = torch.randn(x_star.shape, generator=gen, dtype=torch.float64).to(x_star)
        delta[:, 0] = 0
        delta = delta * (perturbation * at_least_fp32(x_star).pow(2).mean().sqrt()).to(x_star.dtype)
        crm.append(_relative(_jacobi_map(block, x_star + delta, z, cond) - _jacobi_map(block, x_star, z, cond),
                             delta))
        for init in INITS:
            igm[init].append(_relative(_jacobi_map(block, _initial_iterate(z, init), z, cond) - x_star, x_star))
    if num_tough is not None:
        tough = frozenset(sorted(range(len(crm)), key=lambda k: -crm[k])[:num_tough])
    else:
        tough = frozenset(k for k, c in enumerate(crm) if c > dominance * min(crm))
    best = tuple(min(INITS, key=lambda init: igm[init][k]) for k in range(len(crm)))
    return Calibration(tuple(crm), {k: tuple(v) for k, v in igm.items()}, tough, best)
