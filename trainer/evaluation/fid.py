"""Fréchet Inception Distance: the formula of each convention, feature statistics accumulated across ranks, and
the statistics files of each convention.

FID between Gaussians N(μ₁, Σ₁) and N(μ₂, Σ₂) fitted to Inception pool3 features (``inception``: the networks and
their feeding): FID = ||μ₁ − μ₂||² + Tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^½), computed by the library of the statistics'
convention:

- ``paper``: torchmetrics' ``FrechetInceptionDistance.compute()`` arithmetic, from the float64 sums (mean
  ``Σx/n``, covariance ``(Σxxᵀ − n μᵀμ)/(n − 1)``, then its ``_compute_fid``: the trace of the square root from the
  eigenvalues of Σ₁Σ₂), returned in float32 as ``compute()`` returns it;
- ``pytorch-fid``: ``pytorch_fid.fid_score.calculate_frechet_distance`` (``scipy.linalg.sqrtm``, ε = 1e-6 fallback);
- statistics of other features (no convention, e.g. a classifier's): ``frechet_distance`` below, in float64 with
  pytorch-fid's fallback and a check of the root.

Statistics of different conventions are never compared (``FIDError`` naming both).

Features are accumulated as sums — n, Σx and Σxxᵀ in float64, exactly what torchmetrics' ``update`` accumulates — so
that ranks combine by one all-reduce and two ranks give the statistics of one process over the same images (up to
float64 summation order).

Files
    ``paper``: a ``.pth`` in the official TarFlow code's format (``{dataset}_{size}_fid_stats.pth``,
    ``prepare_fid_stats.py``): the state dict of its ``FrechetInceptionDistance`` subclass, whose states are
    buffers — ``real_features_sum``, ``real_features_cov_sum``, ``real_features_num_samples``, the (empty)
    ``fake_features_*`` and the Inception's weights (``inception.*``; their digest is checked against the network's).
    The official code loads our files with ``load_state_dict`` and we read its files (and any torchmetrics state
    dict holding the ``real_features_*`` states). Our provenance (convention, network, data)
    rides in the state dict's ``_metadata`` under the key ``tarflow``, which ``load_state_dict`` ignores; files
    without it (the official ones) are taken as ``paper`` statistics whose network and images cannot be checked.
    ``pytorch-fid``: an ``.npz`` with ``mu`` (D,), ``sigma`` (D, D), ``n`` and ``meta`` (JSON: convention, network,
    data set, split, image shape, preprocessing). A pytorch-fid ``.npz`` (``mu``/``sigma`` only) is accepted,
    without the provenance checks.
"""

from __future__ import annotations

import json
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from .inception import PAPER, PYTORCH_FID, weights_digest

SQRTM_EPS = 1e-6
SQRTM_RESIDUAL_TOL = 1e-3  # relative Frobenius error of (root)² against the product beyond which the root failed
IMAG_ATOL = 1e-3
STATS_VERSION = 1
META_KEY = "tarflow"  # our provenance in a .pth state dict's _metadata (which load_state_dict ignores)


class FIDError(ValueError):
    """Statistics that cannot be compared, or a distance that cannot be computed; the message says why."""


# ---------------------------------------------------------------- the formula
def _sqrtm(a: np.ndarray) -> np.ndarray:
    import scipy.linalg

    with warnings.catch_warnings():  # "matrix is singular" and the like: the result is checked below instead
        warnings.simplefilter("ignore")
        root = scipy.linalg.sqrtm(a)
    return root[0] if isinstance(root, tuple) else root


def _root_ok(root: np.ndarray, product: np.ndarray) -> bool:
    if not np.isfinite(root).all():
        return False
    scale = np.linalg.norm(product)
    if scale == 0:
        return True
    residual = np.linalg.norm(root @ root - product) / scale
    return bool(residual <= SQRTM_RESIDUAL_TOL)


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray, eps: float = SQRTM_EPS) -> float:
    """Tr (Σ₁ Σ₂)^½, with pytorch-fid's ε-offset fallback and the imaginary-part check."""
    product = sigma1 @ sigma2
    root = _sqrtm(product)
    if not _root_ok(root, product):
        warnings.warn(f"FID: the square root of Σ₁Σ₂ failed (nearly singular product); adding {eps} to the "
                      f"diagonal of both covariances", RuntimeWarning, stacklevel=3)
        offset = np.eye(sigma1.shape[0]) * eps
        product = (sigma1 + offset) @ (sigma2 + offset)
        root = _sqrtm(product)
        if not np.isfinite(root).all():
            raise FIDError("FID: the square root of Σ₁Σ₂ is not finite even with the ε offset; are the "
                           "covariances finite and positive semi-definite?")
    if np.iscomplexobj(root):
        if not np.allclose(np.diagonal(root).imag, 0, atol=IMAG_ATOL):
            raise FIDError(f"FID: the square root of Σ₁Σ₂ has an imaginary component of "
                           f"{np.max(np.abs(root.imag)):.3g} (> {IMAG_ATOL}); the covariances are not positive "
                           f"semi-definite or are badly conditioned")
        root = root.real
    return float(np.trace(root))


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = SQRTM_EPS) -> float:
    """||μ₁ − μ₂||² + Tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^½) in float64."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise FIDError(f"FID: statistics of different shapes: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} "
                       f"vs {sigma2.shape} (features of different networks?)")
    for name, value in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(value).all():
            raise FIDError(f"FID: {name} has non-finite values")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2, eps))


# ---------------------------------------------------------------- accumulation
class FeatureAccumulator:
    """n, Σx, Σxxᵀ of feature vectors in float64 on ``device``; ``all_reduce()`` sums them over ranks."""

    def __init__(self, dim: int, device: torch.device | str = "cpu") -> None:
        self.dim = dim
        self.n = 0
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, features: torch.Tensor) -> None:
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ValueError(f"expected features of shape (B, {self.dim}), got {tuple(features.shape)}")
        f = features.detach().to(self.sum.device, torch.float64)
        if not bool(torch.isfinite(f).all()):
            raise FIDError("non-finite Inception features (a non-finite image reached the network?)")
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.T @ f

    def merge(self, other: "FeatureAccumulator") -> None:
        self.n += other.n
        self.sum += other.sum.to(self.sum.device)
        self.outer += other.outer.to(self.outer.device)

    def all_reduce(self) -> None:
        """Sum over all ranks (a no-op in one process). Every rank must call it."""
        from ..distributed import active

        if not active():
            return
        import torch.distributed as dist

        n = torch.tensor([float(self.n)], dtype=torch.float64, device=self.sum.device)
        for t in (n, self.sum, self.outer):
            dist.all_reduce(t)
        self.n = int(n.item())

    def mean_and_covariance(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise FIDError(f"FID needs at least 2 images for a covariance, got {self.n}")
        s = self.sum.cpu().numpy()
        mu = s / self.n
        sigma = (self.outer.cpu().numpy() - self.n * np.outer(mu, mu)) / (self.n - 1)
        return mu, (sigma + sigma.T) / 2.0  # exactly symmetric


# ---------------------------------------------------------------- the conventions' formulas
def paper_fid(real: "FeatureStats", fake: "FeatureStats") -> float:
    """torchmetrics' ``FrechetInceptionDistance.compute()`` on these states (its arithmetic, its ``_compute_fid``)."""
    from torchmetrics.image.fid import _compute_fid

    def mean_cov(s: FeatureStats) -> tuple[torch.Tensor, torch.Tensor]:
        total, cov_total = (torch.from_numpy(np.ascontiguousarray(a)) for a in s.sums())
        n = torch.tensor(s.n, dtype=torch.int64)
        mean = (total / n).unsqueeze(0)
        return mean.squeeze(0), (cov_total - n * mean.t().mm(mean)) / (n - 1)

    mu_r, cov_r = mean_cov(real)
    mu_f, cov_f = mean_cov(fake)
    return float(_compute_fid(mu_r, cov_r, mu_f, cov_f).to(torch.float32))


def pytorch_fid_distance(a: "FeatureStats", b: "FeatureStats") -> float:
    """pytorch-fid's ``calculate_frechet_distance`` of the two (μ, Σ)."""
    from pytorch_fid.fid_score import calculate_frechet_distance

    try:
        return float(calculate_frechet_distance(a.mu, a.sigma, b.mu, b.sigma))
    except ValueError as e:  # "Imaginary component ...": the covariances are not positive semi-definite
        raise FIDError(f"FID (pytorch-fid): {e}") from None


# ---------------------------------------------------------------- statistics
@dataclass
class FeatureStats:
    mu: np.ndarray
    sigma: np.ndarray
    n: int
    meta: dict[str, Any] = field(default_factory=dict)
    feature_sum: np.ndarray | None = field(default=None, repr=False)  # Σx, Σxxᵀ (float64) where known
    cov_sum: np.ndarray | None = field(default=None, repr=False)

    @classmethod
    def from_accumulator(cls, acc: FeatureAccumulator, meta: dict[str, Any] | None = None) -> "FeatureStats":
        mu, sigma = acc.mean_and_covariance()
        return cls(mu, sigma, acc.n, dict(meta or {}), acc.sum.cpu().numpy().copy(), acc.outer.cpu().numpy().copy())

    @property
    def convention(self) -> str | None:
        """``paper`` or ``pytorch-fid`` for FID statistics; None for other features (the generic formula)."""
        return self.meta.get("convention")

    def sums(self) -> tuple[np.ndarray, np.ndarray]:
        """(Σx, Σxxᵀ), rebuilt from (μ, Σ, n) when only those are known."""
        if self.feature_sum is not None and self.cov_sum is not None:
            return self.feature_sum, self.cov_sum
        return self.mu * self.n, self.sigma * (self.n - 1) + self.n * np.outer(self.mu, self.mu)

    def fid(self, reference: "FeatureStats") -> float:
        """The FID of these (sample) statistics against ``reference``, by the formula of their convention."""
        mine, theirs = self.convention, reference.convention
        if mine != theirs:
            raise FIDError(f"FID between statistics of two conventions: {mine or 'none'} (these) and "
                           f"{theirs or 'none'} (the reference); their features differ (quantisation, resize, "
                           f"network): compute both with the same --fid-convention")
        if mine == PAPER:
            return paper_fid(reference, self)
        if mine == PYTORCH_FID:
            return pytorch_fid_distance(self, reference)
        return frechet_distance(self.mu, self.sigma, reference.mu, reference.sigma)


def stats_suffix(convention: str | None) -> str:
    """The file format of a convention's statistics: the official ``.pth`` for paper, ``.npz`` otherwise."""
    return ".pth" if convention == PAPER else ".npz"


def official_stats_name(dataset: str, size: int, convention: str) -> str:
    """The official code's name, ``{dataset}_{size}_fid_stats.pth`` (``.npz`` for pytorch-fid statistics)."""
    return f"{dataset}_{size}_fid_stats{stats_suffix(convention)}"


def save_stats(stats: FeatureStats, path: str | Path, network_state: Mapping[str, torch.Tensor] | None = None) \
        -> Path:
    """Paper statistics: the official state dict (``.pth``), with ``network_state`` (``FIDNetwork.stats_state()``:
    the Inception's weights, which the official file holds too, so that the official code can load it strictly);
    others: ``mu``, ``sigma``, ``n``, ``meta`` (JSON) as an ``.npz``. Written atomically."""
    from .image_grid import _atomic_write, save_samples_npz

    path = Path(path)
    meta = {"version": STATS_VERSION, **stats.meta}
    want = stats_suffix(stats.convention)
    if path.suffix != want:
        raise FIDError(f"{path}: {stats.convention or 'these'} statistics are written as a {want} file "
                       f"({'the official TarFlow format' if want == '.pth' else 'mu, sigma, n, meta'})")
    if want == ".npz":
        return save_samples_npz(path, mu=stats.mu.astype(np.float64), sigma=stats.sigma.astype(np.float64),
                                n=np.int64(stats.n), meta=np.array(json.dumps(meta, sort_keys=True)))
    total, cov_total = stats.sums()
    d = total.shape[0]
    state = OrderedDict([
        ("real_features_sum", torch.from_numpy(np.array(total, np.float64))),
        ("real_features_cov_sum", torch.from_numpy(np.array(cov_total, np.float64))),
        ("real_features_num_samples", torch.tensor(stats.n, dtype=torch.int64)),
        ("fake_features_sum", torch.zeros(d, dtype=torch.float64)),
        ("fake_features_cov_sum", torch.zeros(d, d, dtype=torch.float64)),
        ("fake_features_num_samples", torch.tensor(0, dtype=torch.int64)),
        *(network_state or {}).items(),
    ])
    state._metadata = OrderedDict([("", {"version": 1}), (META_KEY, json.dumps(meta, sort_keys=True))])
    return _atomic_write(path, lambda f: torch.save(state, f))


def load_stats(path: str | Path) -> FeatureStats:
    path = Path(path)
    if not path.is_file():
        raise FIDError(f"reference statistics {path} do not exist; make them with "
                       f"`tarflow eval stats DATA_URI --out {path}`")
    if path.suffix == ".pth":
        return _load_official(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            if "mu" not in f or "sigma" not in f:
                raise FIDError(f"{path} holds {sorted(f.files)}, not FID statistics (mu, sigma)")
            mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
            n = int(f["n"]) if "n" in f else 0
            meta = json.loads(str(f["meta"])) if "meta" in f else {}
    except FIDError:
        raise
    except Exception as e:
        raise FIDError(f"reference statistics {path} are unreadable ({type(e).__name__}: {e})") from None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise FIDError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not (D,) and (D, D)")
    meta.setdefault("convention", PYTORCH_FID)  # the .npz files: pytorch-fid's, and ours of that convention
    return FeatureStats(mu, sigma, n, meta)


def _load_official(path: Path) -> FeatureStats:
    """A state dict holding torchmetrics' ``real_features_*`` states (the official stats file, or ours)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FIDError(f"reference statistics {path} are unreadable ({type(e).__name__}: {e})") from None
    keys = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")
    if not isinstance(state, dict) or not all(k in state for k in keys):
        found = sorted(state)[:8] if isinstance(state, dict) else type(state).__name__
        raise FIDError(f"{path} is not a FrechetInceptionDistance state dict with {', '.join(keys)} (found {found})")
    total, cov_total = (state[k].to(torch.float64).numpy() for k in keys[:2])
    n = int(state[keys[2]])
    if total.ndim != 1 or cov_total.shape != (total.shape[0],) * 2 or n < 2:
        raise FIDError(f"{path}: real_features_sum {total.shape}, real_features_cov_sum {cov_total.shape} and "
                       f"{n} samples are not FID statistics")
    meta = getattr(state, "_metadata", {}).get(META_KEY)
    meta = json.loads(meta) if isinstance(meta, str) else {}
    meta["convention"] = PAPER  # the format is the paper convention's
    embedded = {k[len("inception."):]: v for k, v in state.items() if k.startswith("inception.")}
    if embedded:  # the official files hold the metric's Inception weights: which ones made them can be checked
        meta["weights_digest"] = weights_digest(embedded)
    mu = total / n
    sigma = (cov_total - n * np.outer(mu, mu)) / (n - 1)
    return FeatureStats(mu, (sigma + sigma.T) / 2.0, n, meta, total, cov_total)


def check_comparable(reference: FeatureStats, *, network: str, feature_dim: int,
                     image_shape: tuple[int, int, int] | None, convention: str | None = None,
                     weights_digest: str | None = None, where: str = "reference statistics") -> list[str]:
    """Raise :class:`FIDError` when the reference cannot be compared with features of ``network`` (of
    ``convention``, with weights of ``weights_digest``) on images of ``image_shape``; return warnings for what cannot
    be checked (a file without provenance)."""
    if convention is not None and reference.convention != convention:
        raise FIDError(f"{where} are {reference.convention or 'no FID convention'} statistics but this evaluation "
                       f"uses the {convention} convention: the two feed and resize images differently and their "
                       f"FIDs are not comparable; recompute them with `tarflow eval stats --fid-convention "
                       f"{convention}` or evaluate with --fid-convention {reference.convention}")
    if reference.mu.shape[0] != feature_dim:
        raise FIDError(f"{where} have {reference.mu.shape[0]}-d features but the Inception network gives "
                       f"{feature_dim}-d ones: they were made with another network")
    meta = reference.meta
    embedded = meta.get("weights_digest")
    if weights_digest and embedded and embedded != weights_digest:
        raise FIDError(f"{where} were computed with other Inception weights (the file holds weights with digest "
                       f"{embedded}, this evaluation's have {weights_digest}): FIDs across feature extractors are "
                       f"meaningless; use the weights file they were made with or recompute them")
    if not meta.get("network"):
        if weights_digest and embedded == weights_digest:
            return []  # an official file made with these very weights; the images cannot be checked
        return [f"{where} carry no provenance (an official or pytorch-fid file?): the network and the images they "
                f"came from cannot be checked"]
    if meta.get("network") != network:
        raise FIDError(f"{where} were computed with the network {meta.get('network')!r}, this evaluation uses "
                       f"{network!r}: FIDs across feature extractors are meaningless; recompute them with "
                       f"`tarflow eval stats` and the same --inception")
    ref_shape = meta.get("image_shape")
    if image_shape is not None and ref_shape is not None and tuple(ref_shape) != tuple(image_shape):
        raise FIDError(f"{where} describe images of shape {tuple(ref_shape)} but the checkpoint generates "
                       f"{tuple(image_shape)}: compute them from data at the model's resolution (data.resize / "
                       f"data.crop) or pick the matching file")
    return []
