"""Fitting saturating power laws L(x) = E + A·x^(−α) with bootstrap confidence intervals, and the compute frontier.

Why least squares in log space: bits/dim from different seeds scatter by a roughly constant *relative* amount, and the
losses of the smallest models are several times those of the largest. Residuals log L − log L̂ weigh every point by its
relative error, so the small models do not dominate the fit and the noise model matches (multiplicative, ~lognormal).

Why several starting points: the problem is non-convex. E and the power-law term trade off against each other (a
slightly larger E with a steeper α fits a short range of x almost as well as a smaller E with a flatter α), so a
single local search lands in whichever valley it starts nearest. We start from a small grid over (α, E), solve each
start with a bounded trust-region method, and keep the lowest cost.

Parameterisation: (E, a, α) with bounds E ≥ 0 and α > 0, and A = exp(a)·x_ref^α, where x_ref is the geometric mean of
the x values. A bound (not E = exp(e)) lets E reach 0 for a pure power law, where exp(e) would drift e towards −∞
and stall; exp(a) keeps A > 0; and dividing x by x_ref makes a the log of the power-law term in the middle of the
data, so the fit is as well conditioned for compute (x ~ 1e18 FLOPs, A ~ 1e5) as for parameter counts.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy.optimize import least_squares

Resample = Literal["auto", "within", "points"]

_ALPHA_BOUNDS = (1e-4, 10.0)
_LOGA_BOUNDS = (-60.0, 60.0)  # the power-law term at x_ref is between e^-60 and e^60 of a loss unit
_ALPHA_STARTS = (0.05, 0.15, 0.4, 1.0, 2.5)
_E_START_FRACTIONS = (0.0, 0.5, 0.9)  # of the smallest observed loss
N_PARAMETERS = 3  # E, A, alpha
# A direction of the parameters that moves the losses by less than this fraction of the best-determined one is flat:
# the points do not pin the law down along it (well-posed studies measure 1e-3 and above; flat losses 1e-12).
_SINGULAR_RATIO = 1e-7


@dataclass(frozen=True)
class Points:
    """Observed (x, loss) pairs; ``seed`` labels runs for plotting, ``size`` is the model size N of each point (needed
    by the compute frontier, where x is compute)."""

    x: np.ndarray
    loss: np.ndarray
    seed: np.ndarray | None = None
    size: np.ndarray | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "x", np.asarray(self.x, dtype=float).ravel())
        object.__setattr__(self, "loss", np.asarray(self.loss, dtype=float).ravel())
        for name in ("seed", "size"):
            value = getattr(self, name)
            if value is not None:
                value = np.asarray(value).ravel()
                if len(value) != len(self.x):
                    raise ValueError(f"{name} has {len(value)} entries but x has {len(self.x)}")
                object.__setattr__(self, name, value)
        if len(self.loss) != len(self.x):
            raise ValueError(f"x has {len(self.x)} entries but loss has {len(self.loss)}")

    def __len__(self) -> int:
        return len(self.x)


@dataclass
class ScalingFit:
    """A fitted L(x) = E + A·x^(−α). ``intervals`` maps "E", "A", "alpha" to (low, high) percentile bounds at
    ``confidence``; ``band_x``/``band_low``/``band_high`` are the pointwise interval of the predicted curve. When the
    data cannot estimate intervals, ``intervals`` is empty, the band has zero width and ``no_intervals`` says why."""

    E: float
    A: float
    alpha: float
    intervals: dict[str, tuple[float, float]]
    confidence: float
    n_points: int
    residual_rms: float  # of log L − log L̂, i.e. about the relative rms error
    band_x: np.ndarray
    band_low: np.ndarray
    band_high: np.ndarray
    n_boot: int = 0  # replicates that produced a fit
    resample: str = "within"
    seed: int = 0
    extra: dict = field(default_factory=dict)
    no_intervals: str = ""  # why there are none (too few points, a degenerate bootstrap, n_boot=0)

    def predict(self, x) -> np.ndarray:
        return _predict(np.asarray(x, dtype=float), self.E, self.A, self.alpha)

    def law(self, symbol: str = "N", intervals: bool = True) -> str:
        """The law as text, e.g. ``L = 1.00 [0.97, 1.03] + 30.2 [26.1, 35.0]·N^−0.351 [0.337, 0.364]``."""

        def fmt(key: str, value: float) -> str:
            if not intervals or key not in self.intervals:
                return f"{value:.3g}"
            lo, hi = self.intervals[key]
            return f"{value:.3g} [{lo:.3g}, {hi:.3g}]"

        law = f"L = {fmt('E', self.E)} + {fmt('A', self.A)}·{symbol}^−{fmt('alpha', self.alpha)}"
        return f"{law} (no intervals: {self.no_intervals})" if intervals and self.no_intervals else law

    def to_dict(self) -> dict:
        return {
            "law": "L = E + A * x^(-alpha)",
            "E": self.E, "A": self.A, "alpha": self.alpha,
            "intervals": {k: [float(lo), float(hi)] for k, (lo, hi) in self.intervals.items()},
            "confidence": self.confidence,
            "n_points": self.n_points,
            "residual_rms": self.residual_rms,
            "n_boot": self.n_boot,
            "resample": self.resample,
            "seed": self.seed,
            "band": {"x": self.band_x.tolist(), "low": self.band_low.tolist(), "high": self.band_high.tolist()},
            **({"extra": self.extra} if self.extra else {}),
            **({"no_intervals": self.no_intervals} if self.no_intervals else {}),
        }

    def to_json(self, indent: int | None = 2) -> str:
        # allow_nan=False: fit.json is read by other tools, and NaN is not JSON.
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, d: dict) -> ScalingFit:
        band = d["band"]
        return cls(
            E=float(d["E"]), A=float(d["A"]), alpha=float(d["alpha"]),
            intervals={k: (float(v[0]), float(v[1])) for k, v in d["intervals"].items()},
            confidence=float(d["confidence"]), n_points=int(d["n_points"]), residual_rms=float(d["residual_rms"]),
            band_x=np.asarray(band["x"], dtype=float), band_low=np.asarray(band["low"], dtype=float),
            band_high=np.asarray(band["high"], dtype=float), n_boot=int(d.get("n_boot", 0)),
            resample=str(d.get("resample", "within")), seed=int(d.get("seed", 0)), extra=dict(d.get("extra", {})),
            no_intervals=str(d.get("no_intervals", "")),
        )

    @classmethod
    def from_json(cls, text: str) -> ScalingFit:
        return cls.from_dict(json.loads(text))


def _predict(x: np.ndarray, E: float, A: float, alpha: float) -> np.ndarray:
    # exp/log form: A·x^−α overflows for large A long before the product does.
    return E + np.exp(np.log(A) - alpha * np.log(x))


def validate(points: Points, what: str = "x") -> None:
    """Raise ValueError naming the problem if the points cannot determine a three-parameter law."""
    x, loss = points.x, points.loss
    if len(x) == 0:
        raise ValueError("no points to fit (are all runs failed?)")
    for name, values in ((what, x), ("loss", loss)):
        bad = ~np.isfinite(values)
        if bad.any():
            raise ValueError(f"{name} has {int(bad.sum())} NaN or infinite value(s); drop those points before fitting")
        if (values <= 0).any():
            raise ValueError(f"{name} must be positive for a log-space fit; got {values[values <= 0].tolist()}")
    distinct = len(np.unique(x))
    if distinct < 3:
        raise ValueError(f"need at least 3 distinct {what} values to fit E, A and alpha; got {distinct}")


def _residuals(theta: np.ndarray, u: np.ndarray, log_loss: np.ndarray) -> np.ndarray:
    E, a, alpha = theta
    return log_loss - np.log(E + np.exp(a - alpha * u))


def _jacobian(theta: np.ndarray, u: np.ndarray, log_loss: np.ndarray) -> np.ndarray:
    E, a, alpha = theta
    p = np.exp(a - alpha * u)
    m = E + p
    return np.stack([-1.0 / m, -p / m, u * p / m], axis=1)


def _starts(u: np.ndarray, loss: np.ndarray) -> list[np.ndarray]:
    starts = []
    floor = loss.min()
    for alpha in _ALPHA_STARTS:
        z = np.exp(-alpha * u)
        for frac in _E_START_FRACTIONS:
            E = frac * floor
            # A' from linear least squares of (L − E) on x^−α: a start already near the valley for this (α, E).
            A = max(float(np.dot(loss - E, z) / np.dot(z, z)), 1e-12 * floor)
            starts.append(np.array([E, np.clip(math.log(A), *_LOGA_BOUNDS), alpha]))
    return starts


def _solve(u: np.ndarray, log_loss: np.ndarray, starts: list[np.ndarray], tol: float) -> np.ndarray | None:
    lower = [0.0, _LOGA_BOUNDS[0], _ALPHA_BOUNDS[0]]
    upper = [np.inf, _LOGA_BOUNDS[1], _ALPHA_BOUNDS[1]]
    best, best_cost = None, np.inf
    for start in starts:
        start = np.clip(start, np.add(lower, 1e-12), np.subtract(upper, 1e-12))
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            try:
                sol = least_squares(_residuals, start, jac=_jacobian, bounds=(lower, upper), args=(u, log_loss),
                                    method="trf", x_scale="jac", ftol=tol, xtol=tol, gtol=tol, max_nfev=2000)
            except ValueError:  # a start whose residuals are not finite
                continue
        if np.isfinite(sol.cost) and sol.cost < best_cost:
            best, best_cost = sol.x, sol.cost
    return best


def _groups(x: np.ndarray) -> list[np.ndarray]:
    return [np.flatnonzero(x == value) for value in np.unique(x)]


def fit_scaling_law(points: Points, *, n_boot: int = 1000, confidence: float = 0.95, seed: int = 0,
                    resample: Resample = "auto", band_x: np.ndarray | None = None, n_band: int = 100,
                    what: str = "x") -> ScalingFit:
    """Fit L = E + A·x^−α by least squares on log L, with bootstrap percentile intervals.

    Bootstrap (``resample``):
      - ``"within"``: every replicate keeps every x and redraws that x's seeds with replacement. The sizes or budgets
        of a study are chosen by design, not sampled, so a replicate should keep all of them; what is random is the
        seed-to-seed spread (initialisation, data order), and that is what this redraws. Resampling whole sizes
        instead would often drop the smallest or largest size, and the intervals would measure leverage rather than
        noise. The new seeds are the x's mean plus deviations pooled over all x (see ``_draw``). Intervals reflect
        seed noise only, not whether the law is the right shape, and run a little narrow with 2–3 seeds per x.
      - ``"points"``: redraw all points with replacement (replicates with fewer than 3 distinct x are redrawn). Used
        when some x has a single seed, where ``"within"`` would not vary that x at all.
      - ``"auto"`` (default): ``"within"`` if every x has at least 2 points, else ``"points"``.
    ``what`` names x in error messages (e.g. "parameter count").
    """
    validate(points, what)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1); got {confidence}")
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0; got {n_boot}")
    x, loss = points.x, points.loss
    x_ref = float(np.exp(np.log(x).mean()))
    u, log_loss = np.log(x / x_ref), np.log(loss)

    theta = _solve(u, log_loss, _starts(u, loss), tol=1e-12)
    if theta is None:
        raise ValueError("the fit did not converge from any starting point")
    flat = _flat_direction(theta, u, log_loss)
    if flat:
        raise ValueError(f"the {len(x)} points do not determine E, A and alpha: {flat}; add sizes over a wider "
                         f"range of {what}")
    residual_rms = float(np.sqrt(np.mean(_residuals(theta, u, log_loss) ** 2)))

    def to_law(t: np.ndarray) -> tuple[float, float, float]:
        E, a, alpha = (float(v) for v in t)
        return E, float(np.exp(a + alpha * math.log(x_ref))), alpha

    groups = _groups(x)
    if resample == "auto":
        resample = "within" if all(len(g) >= 2 for g in groups) else "points"
    if resample not in ("within", "points"):
        raise ValueError(f"resample must be 'auto', 'within' or 'points'; got {resample!r}")

    if band_x is None:
        band_x = np.geomspace(x.min(), x.max(), n_band)
    band_x = np.asarray(band_x, dtype=float)
    band_u = np.log(band_x / x_ref)

    # With no more points than parameters the law passes through every point (or every x's mean): a bootstrap
    # replicate then refits the same interpolant and its "interval" has zero width whatever the noise.
    no_intervals = "" if n_boot else "not computed (n_boot=0)"
    if n_boot and len(x) <= N_PARAMETERS:
        no_intervals = (f"{len(x)} points for {N_PARAMETERS} parameters (E, A, alpha): the law passes through every "
                        f"point, so nothing measures its uncertainty; intervals need at least {N_PARAMETERS + 1} "
                        f"points (more sizes, or more seeds per size)")
        n_boot = 0
    rng = np.random.default_rng(seed)
    # A replicate is a small perturbation of the data, so it starts from the full-data optimum; the E = 0 start covers
    # the other valley replicates fall into (the pure power law on the boundary). Trying the whole start grid as well
    # gave the same intervals on synthetic studies (1 or 3 seeds per size, α from 0.25 to 1.5) at four times the cost.
    replicate_starts = [theta] if theta[0] == 0 else [theta, np.array([0.0, theta[1], theta[2]])]
    params, curves = [], []
    for _ in range(n_boot):
        drawn = _draw(rng, u, log_loss, groups, resample)
        if drawn is None:
            continue
        t = _solve(*drawn, replicate_starts, tol=1e-8)
        if t is None:
            continue
        params.append(to_law(t))
        curves.append(t[0] + np.exp(t[1] - t[2] * band_u))

    E, A, alpha = to_law(theta)
    central = E + np.exp(theta[1] - theta[2] * band_u)
    tail = 100 * (1 - confidence) / 2
    intervals: dict[str, tuple[float, float]] = {}
    band_low, band_high = central.copy(), central.copy()
    if params:
        p_lo, p_hi = np.percentile(np.array(params), [tail, 100 - tail], axis=0)
        intervals = {k: (float(p_lo[i]), float(p_hi[i])) for i, k in enumerate(("E", "A", "alpha"))}
        no_intervals = _degenerate(intervals, {"E": E, "A": A, "alpha": alpha}, len(params))
        if no_intervals:
            intervals = {}
        else:
            band_low, band_high = np.percentile(np.array(curves), [tail, 100 - tail], axis=0)
    elif n_boot:
        no_intervals = f"none of the {n_boot} bootstrap replicates could be fitted"
    return ScalingFit(E=E, A=A, alpha=alpha, intervals=intervals, confidence=confidence, n_points=len(x),
                      residual_rms=residual_rms, band_x=band_x, band_low=band_low, band_high=band_high,
                      n_boot=len(params) if intervals else 0, resample=resample, seed=seed, no_intervals=no_intervals)


def _flat_direction(theta: np.ndarray, u: np.ndarray, log_loss: np.ndarray) -> str:
    """Why the optimum is not unique, or "": a direction of (E, log A, alpha) along which no point's loss moves.
    Each column of the Jacobian is a relative change of L per unit of a scale-free parameter (E in units of the
    smallest loss), so the singular values compare like with like; a power-law term too small to show in any point
    (the losses are flat) leaves A and alpha undetermined."""
    J = _jacobian(theta, u, log_loss)
    J[:, 0] *= float(np.exp(log_loss.min()))
    singular = np.linalg.svd(J, compute_uv=False)
    if singular[-1] < _SINGULAR_RATIO * singular[0]:
        term = float(np.exp(theta[1] - theta[2] * u).max() / np.exp(log_loss).min())
        ratio = singular[-1] / singular[0]
        return (f"the fit is singular (smallest/largest singular value of its Jacobian {ratio:.2g}; the power-law term"
                f" is at most {term:.2g} of the loss), so A and alpha are not determined")
    return ""


def _degenerate(intervals: dict[str, tuple[float, float]], estimate: dict[str, float], replicates: int) -> str:
    """Why these bootstrap intervals cannot be reported, or "": no width in any parameter (every replicate refits the
    same law, so they measure nothing; one parameter alone may sit on its bound, E = 0, in every replicate), or an
    interval that leaves out its own estimate (the replicates settled in another optimum than the data did)."""
    widths = {key: hi - lo for key, (lo, hi) in intervals.items()}
    if all(widths[key] <= 1e-9 * max(abs(estimate[key]), 1e-12) for key in intervals):
        return (f"all {replicates} bootstrap replicates refit the same law: they do not vary the data enough to "
                f"estimate its uncertainty")
    for key, (lo, hi) in intervals.items():
        value = estimate[key]
        slack = 1e-6 * max(abs(value), hi - lo)
        if not lo - slack <= value <= hi + slack:
            return (f"the bootstrap interval of {key} [{lo:.4g}, {hi:.4g}] excludes its own estimate {value:.4g}: "
                    f"the replicates fit another optimum than the data")
    return ""


def _draw(rng: np.random.Generator, u: np.ndarray, log_loss: np.ndarray, groups: list[np.ndarray],
          resample: str) -> tuple[np.ndarray, np.ndarray] | None:
    """One bootstrap replicate of (u, log L)."""
    if resample == "within":
        # Each x keeps its mean (in log space) and gets new seeds: the mean plus deviations drawn from all x's pooled
        # deviations, each scaled by sqrt(n/(n−1)) because a deviation from a sample mean understates the spread.
        # Pooling assumes the relative seed noise is the same at every x, which the equal-weight log-space fit
        # assumes already, and estimates it from every seed instead of 2 or 3 at each x. On synthetic studies
        # (6 sizes × 3 seeds, 1% noise, 150 draws) the nominal 95% intervals held the true E, A and α 85–91% of the
        # time this way, against 81–87% when each x redraws only its own seeds: with few seeds the intervals are
        # still somewhat optimistic.
        means = np.zeros_like(log_loss)
        scale = np.zeros_like(log_loss)
        for g in groups:
            means[g] = log_loss[g].mean()
            scale[g] = math.sqrt(len(g) / (len(g) - 1)) if len(g) > 1 else 0.0
        pool = ((log_loss - means) * scale)[scale > 0]
        if len(pool) == 0:  # one seed at every x: nothing to redraw
            return u, log_loss
        return u, means + rng.choice(pool, size=len(u)) * (scale > 0)
    for _ in range(100):
        idx = rng.integers(len(u), size=len(u))
        if len(np.unique(u[idx])) >= 3:
            return u[idx], log_loss[idx]
    return None


@dataclass
class Frontier:
    """The compute-optimal frontier. ``level_*``: for each compute level, the best configuration (lowest mean loss
    over seeds) and its model size. ``compute``/``loss``/``size``: the levels on the lower envelope, i.e. whose best
    loss beats every cheaper level's; sorted by compute. ``points``: every seed's run of the envelope configurations,
    ready for ``fit_scaling_law`` (x = compute)."""

    level_compute: np.ndarray
    level_loss: np.ndarray
    level_size: np.ndarray
    compute: np.ndarray
    loss: np.ndarray
    size: np.ndarray
    points: Points

    def to_dict(self) -> dict:
        return {"levels": [{"compute": float(c), "loss": float(l), "size": float(n)}
                           for c, l, n in zip(self.level_compute, self.level_loss, self.level_size)],
                "frontier": [{"compute": float(c), "loss": float(l), "size": float(n)}
                             for c, l, n in zip(self.compute, self.loss, self.size)]}


def compute_frontier(points: Points, *, rtol: float = 0.02) -> Frontier:
    """The best loss and the model size achieving it, per compute level, and the lower envelope over compute.

    ``points.x`` is training compute and ``points.size`` the model size. Runs of the same (size, compute) are
    averaged over seeds first: the frontier is about expected loss, not a lucky seed. Compute values within ``rtol``
    of each other are one level, because budgets given in FLOPs become whole steps and land slightly off the level.
    Fit L(C) on the frontier with ``fit_scaling_law(frontier.points, what="compute")``.
    """
    if points.size is None:
        raise ValueError("compute_frontier needs the model size of each point (Points.size)")
    keep = np.isfinite(points.x) & np.isfinite(points.loss) & (points.x > 0) & (points.loss > 0)
    if not keep.any():
        raise ValueError("no points with finite, positive compute and loss")
    C, L, N = points.x[keep], points.loss[keep], np.asarray(points.size, dtype=float)[keep]

    configs = sorted({(n, c) for n, c in zip(N, C)}, key=lambda nc: (nc[1], nc[0]))
    config_loss = np.array([L[(N == n) & (C == c)].mean() for n, c in configs])
    config_c = np.array([c for _, c in configs])
    config_n = np.array([n for n, _ in configs])

    # Levels: walk the configs in compute order and start a new level when compute moves by more than rtol.
    # Compared with the level's first config, not the previous one, so that levels do not chain upwards.
    level_of = np.zeros(len(configs), dtype=int)
    level_start = config_c[0]
    for i in range(1, len(configs)):
        if config_c[i] > level_start * (1 + rtol):
            level_start = config_c[i]
            level_of[i] = level_of[i - 1] + 1
        else:
            level_of[i] = level_of[i - 1]
    best = [np.flatnonzero(level_of == k)[np.argmin(config_loss[level_of == k])] for k in range(level_of[-1] + 1)]
    best = np.array(best)

    on_envelope, lowest = [], np.inf
    for i in best:
        if config_loss[i] < lowest:
            on_envelope.append(i)
            lowest = config_loss[i]
    env = np.array(on_envelope)

    member = np.zeros(len(C), dtype=bool)
    for i in env:
        member |= (N == config_n[i]) & (C == config_c[i])
    seed = None if points.seed is None else points.seed[keep][member]
    return Frontier(level_compute=config_c[best], level_loss=config_loss[best], level_size=config_n[best],
                    compute=config_c[env], loss=config_loss[env], size=config_n[env],
                    points=Points(x=C[member], loss=L[member], seed=seed, size=N[member]))
