"""Fréchet Inception Distance: the formula, feature statistics accumulated across ranks, reference statistics files.

FID between Gaussians N(μ₁, Σ₁) and N(μ₂, Σ₂) fitted to Inception pool3 features (see ``inception`` for the network
and the image preprocessing):

    FID = ||μ₁ − μ₂||² + Tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^½)

computed in float64 as pytorch-fid does: ``scipy.linalg.sqrtm`` of the product; if that is not finite (or does not
square back to the product: a failed square root of a nearly singular product), ε = 1e-6 is added to both
diagonals and the root taken again; imaginary parts of the root, which rounding produces for singular products,
are dropped after checking that they are negligible (|imag| ≤ 1e-3 on the diagonal), else it is an error.

Features are accumulated as sums — n, Σx and Σxxᵀ in float64 — so that ranks combine by one all-reduce and two
ranks give the statistics of one process over the same images (up to float64 summation order). The covariance is
the unbiased ``(Σxxᵀ − n μμᵀ)/(n − 1)`` (numpy's ``np.cov``, as pytorch-fid). Pool3 features are post-ReLU averages
of order 0.1–1, so the float64 sums lose nothing that matters at 2048 dimensions and millions of images.

Reference statistics are ``.npz`` files holding ``mu`` (D,), ``sigma`` (D, D), ``n`` and ``meta`` (JSON: the data
set, split and image shape, the preprocessing, the network's identity). A pytorch-fid ``.npz`` (``mu``/``sigma``
only) is accepted, without the provenance checks.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

SQRTM_EPS = 1e-6
SQRTM_RESIDUAL_TOL = 1e-3  # relative Frobenius error of (root)² against the product beyond which the root failed
IMAG_ATOL = 1e-3
STATS_VERSION = 1


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


# ---------------------------------------------------------------- statistics files
@dataclass
class FeatureStats:
    mu: np.ndarray
    sigma: np.ndarray
    n: int
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_accumulator(cls, acc: FeatureAccumulator, meta: dict[str, Any] | None = None) -> "FeatureStats":
        mu, sigma = acc.mean_and_covariance()
        return cls(mu, sigma, acc.n, dict(meta or {}))

    def fid(self, other: "FeatureStats") -> float:
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma)


def save_stats(stats: FeatureStats, path: str | Path) -> Path:
    """``mu``, ``sigma``, ``n``, ``meta`` (JSON) as an .npz, written atomically."""
    from .image_grid import save_samples_npz

    meta = {"version": STATS_VERSION, **stats.meta}
    return save_samples_npz(path, mu=stats.mu.astype(np.float64), sigma=stats.sigma.astype(np.float64),
                            n=np.int64(stats.n), meta=np.array(json.dumps(meta, sort_keys=True)))


def load_stats(path: str | Path) -> FeatureStats:
    path = Path(path)
    if not path.is_file():
        raise FIDError(f"reference statistics {path} do not exist; make them with "
                       f"`tarflow eval stats DATA_URI --out {path}`")
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
    return FeatureStats(mu, sigma, n, meta)


def check_comparable(reference: FeatureStats, *, network: str, feature_dim: int,
                     image_shape: tuple[int, int, int] | None, where: str = "reference statistics") -> list[str]:
    """Raise :class:`FIDError` when the reference cannot be compared with features of ``network`` on images of
    ``image_shape``; return warnings for what cannot be checked (a file without provenance)."""
    if reference.mu.shape[0] != feature_dim:
        raise FIDError(f"{where} have {reference.mu.shape[0]}-d features but the Inception network gives "
                       f"{feature_dim}-d ones: they were made with another network")
    meta = reference.meta
    if not meta:
        return [f"{where} carry no provenance (a pytorch-fid file?): the network and the images they came from "
                f"cannot be checked"]
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
