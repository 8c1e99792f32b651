"""The FID formulas of both conventions (their libraries') and the generic one against closed forms, feature
accumulation, the statistics files of each convention (the paper's: the official code's state dict). (Accumulation
over 2 real ranks against torchmetrics' own single-process FID: tests/test_tarflow_evaluate.py, which launches
torchrun once for all its 2-rank checks.)"""

import numpy as np
import pytest
import torch
from torchmetrics.image.fid import FrechetInceptionDistance

from trainer.evaluation import fid as fid_module
from trainer.evaluation.fid import (
    FeatureAccumulator,
    FeatureStats,
    FIDError,
    check_comparable,
    frechet_distance,
    load_stats,
    save_stats,
)
from trainer.evaluation.inception import PAPER, PYTORCH_FID, WEIGHTS, load_fid_network, official_resize


class OfficialFID(FrechetInceptionDistance):
    """apple/ml-tarflow's ``utils.FID``: the metric's states registered as buffers, so that its state dict (the
    official ``{dataset}_{size}_fid_stats.pth``) holds them."""

    def add_state(self, name, default, *args, **kwargs):
        self.register_buffer(name, default)


def rotation(d: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q


def closed_form(mu1, a, mu2, b) -> float:
    """FID of N(mu1, Q diag(a) Qᵀ) and N(mu2, Q diag(b) Qᵀ): the covariances commute, so the root is Q diag(√ab) Qᵀ."""
    return float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())


def test_identical_gaussians_are_at_distance_zero():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 16)) @ rng.normal(size=(16, 16))
    mu, sigma = x.mean(0), np.cov(x, rowvar=False)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)


def test_diagonal_covariances_match_the_closed_form():
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.1, 3.0, 32), rng.uniform(0.1, 3.0, 32)
    mu1, mu2 = rng.normal(size=32), rng.normal(size=32)
    value = frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert value == pytest.approx(closed_form(mu1, a, mu2, b), rel=1e-10)
    # the Fréchet distance is symmetric; a pure mean shift costs ||Δμ||²
    assert frechet_distance(mu2, np.diag(b), mu1, np.diag(a)) == pytest.approx(value, rel=1e-10)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(a)) == pytest.approx(((mu1 - mu2) ** 2).sum(), rel=1e-10)


def test_rotated_commuting_covariances_match_the_closed_form():
    rng = np.random.default_rng(2)
    q = rotation(24, 3)
    a, b = rng.uniform(0.1, 2.0, 24), rng.uniform(0.1, 2.0, 24)
    mu1, mu2 = rng.normal(size=24), rng.normal(size=24)
    value = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert value == pytest.approx(closed_form(mu1, a, mu2, b), rel=1e-9)


def test_nearly_singular_covariances():
    rng = np.random.default_rng(4)
    d = 64
    q = rotation(d, 5)
    a, b = rng.uniform(0.1, 2.0, d), rng.uniform(0.1, 2.0, d)
    a[:40], b[:30] = 0.0, 0.0   # rank 24 and 34
    a[40:45] = 1e-14            # and some eigenvalues at rounding level
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    value = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert value == pytest.approx(closed_form(mu1, a, mu2, b), abs=1e-5)
    # Covariances estimated from fewer samples than dimensions (rank-deficient, as with few FID samples):
    # the distance of a set to itself is 0 and the distance is symmetric. The root of a zero eigenvalue of Σ₁Σ₂ is
    # the root of its rounding error (√(1e-16·||Σ||²) ≈ 1e-8 each), hence the absolute tolerance (Tr Σ ≈ 64).
    x, y = rng.normal(size=(20, d)), rng.normal(size=(30, d)) + 0.1
    sx, sy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    assert frechet_distance(x.mean(0), sx, x.mean(0), sx) == pytest.approx(0.0, abs=1e-5)
    assert frechet_distance(x.mean(0), sx, y.mean(0), sy) == pytest.approx(
        frechet_distance(y.mean(0), sy, x.mean(0), sx), rel=1e-6)


def test_a_failed_square_root_falls_back_to_the_eps_offset(monkeypatch):
    real = fid_module._sqrtm
    calls = []

    def failing_once(a):
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else real(a)

    monkeypatch.setattr(fid_module, "_sqrtm", failing_once)
    rng = np.random.default_rng(6)
    a, b = rng.uniform(0.0, 2.0, 8), rng.uniform(0.0, 2.0, 8)
    a[:3] = 0.0
    mu = np.zeros(8)
    with pytest.warns(RuntimeWarning, match="adding 1e-06 to the diagonal"):
        value = frechet_distance(mu, np.diag(a), mu, np.diag(b))
    eps = fid_module.SQRTM_EPS  # the offset enters the root only: Tr Σ₁ + Tr Σ₂ − 2 Σ √((a+ε)(b+ε))
    expected = a.sum() + b.sum() - 2 * np.sqrt((a + eps) * (b + eps)).sum()
    assert len(calls) == 2 and value == pytest.approx(expected, rel=1e-10)


def test_imaginary_parts_are_dropped_only_when_negligible(monkeypatch):
    sigma = np.diag([1.0, 2.0, 3.0])
    monkeypatch.setattr(fid_module, "_sqrtm", lambda a: np.diag(np.sqrt(np.diag(a))) + 1e-9j)
    assert frechet_distance(np.zeros(3), sigma, np.zeros(3), sigma) == pytest.approx(0.0, abs=1e-12)
    monkeypatch.setattr(fid_module, "_sqrtm", lambda a: np.diag(np.sqrt(np.diag(a))) + 0.5j)
    # (such a root does not square back to the product: the ε offset is tried first, with the same outcome)
    with pytest.raises(FIDError, match="imaginary component of 0.5"), pytest.warns(RuntimeWarning):
        frechet_distance(np.zeros(3), sigma, np.zeros(3), sigma)


def test_statistics_of_different_shapes_or_non_finite_are_errors():
    with pytest.raises(FIDError, match="different shapes"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(FIDError, match="mu2 has non-finite values"):
        frechet_distance(np.zeros(2), np.eye(2), np.array([0.0, np.nan]), np.eye(2))


def test_accumulated_statistics_are_numpy_mean_and_unbiased_covariance():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(103, 12)) * rng.uniform(0.1, 2, 12) + rng.uniform(0, 1, 12)
    whole = FeatureAccumulator(12)
    whole.update(torch.from_numpy(x).float())
    parts = [FeatureAccumulator(12) for _ in range(3)]
    for i, part in enumerate(parts):  # any split and order of the images gives the same sums
        for chunk in np.array_split(x[i::3], 2):
            part.update(torch.from_numpy(chunk).float())
    merged = FeatureAccumulator(12)
    for part in parts:
        merged.merge(part)
    x32 = x.astype(np.float32).astype(np.float64)
    for acc in (whole, merged):
        mu, sigma = acc.mean_and_covariance()
        assert acc.n == 103
        np.testing.assert_allclose(mu, x32.mean(0), rtol=1e-12)
        np.testing.assert_allclose(sigma, np.cov(x32, rowvar=False), rtol=1e-9, atol=1e-12)
    with pytest.raises(FIDError, match="non-finite Inception features"):
        whole.update(torch.tensor([[float("nan")] * 12]))
    with pytest.raises(FIDError, match="at least 2 images"):
        FeatureAccumulator(3).mean_and_covariance()


def test_statistics_files_round_trip_and_refuse_what_cannot_be_compared(tmp_path):
    rng = np.random.default_rng(8)
    meta = {"network": "net-A", "image_shape": [1, 8, 8], "convention": PYTORCH_FID}
    stats = FeatureStats(rng.normal(size=4), np.eye(4) * 2, 10, meta)
    path = save_stats(stats, tmp_path / "ref.npz")
    back = load_stats(path)
    assert back.n == 10 and back.meta["network"] == "net-A" and back.meta["version"] == 1
    np.testing.assert_array_equal(back.mu, stats.mu)
    np.testing.assert_array_equal(back.sigma, stats.sigma)
    assert check_comparable(back, network="net-A", feature_dim=4, image_shape=(1, 8, 8), convention=PYTORCH_FID) == []
    with pytest.raises(FIDError, match="computed with the network 'net-A', this evaluation uses 'net-B'"):
        check_comparable(back, network="net-B", feature_dim=4, image_shape=(1, 8, 8))
    with pytest.raises(FIDError, match=r"describe images of shape \(1, 8, 8\) but the checkpoint generates "
                                       r"\(3, 32, 32\)"):
        check_comparable(back, network="net-A", feature_dim=4, image_shape=(3, 32, 32))
    with pytest.raises(FIDError, match="have 4-d features but the Inception network gives 2048-d"):
        check_comparable(back, network="net-A", feature_dim=2048, image_shape=None)
    # mixing conventions names both
    with pytest.raises(FIDError, match="are pytorch-fid statistics but this evaluation uses the paper convention"):
        check_comparable(back, network="net-A", feature_dim=4, image_shape=(1, 8, 8), convention=PAPER)
    paper = FeatureStats(stats.mu, stats.sigma, 10, {**meta, "convention": PAPER})
    with pytest.raises(FIDError, match=r"two conventions: pytorch-fid \(these\) and paper \(the reference\)"):
        back.fid(paper)
    with pytest.raises(FIDError, match="paper statistics are written as a .pth file"):
        save_stats(paper, tmp_path / "paper.npz")
    # a pytorch-fid file: mu and sigma only; usable as pytorch-fid statistics, with a warning that nothing can be
    # checked
    np.savez(tmp_path / "pytorch_fid.npz", mu=stats.mu, sigma=stats.sigma)
    bare = load_stats(tmp_path / "pytorch_fid.npz")
    assert bare.convention == PYTORCH_FID
    assert "no provenance" in check_comparable(bare, network="x", feature_dim=4, image_shape=(1, 8, 8))[0]
    with pytest.raises(FIDError, match="do not exist; make them with `tarflow eval stats"):
        load_stats(tmp_path / "missing.npz")
    np.savez(tmp_path / "other.npz", images=np.zeros(3))
    with pytest.raises(FIDError, match="not FID statistics"):
        load_stats(tmp_path / "other.npz")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "model.pth")
    with pytest.raises(FIDError, match="not a FrechetInceptionDistance state dict"):
        load_stats(tmp_path / "model.pth")


def test_the_conventions_formulas_are_their_libraries(tmp_path):
    """paper: torchmetrics' compute() arithmetic from the sums; pytorch-fid: calculate_frechet_distance."""
    from pytorch_fid.fid_score import calculate_frechet_distance
    from torchmetrics.image.fid import _compute_fid

    rng = np.random.default_rng(9)
    x, y = rng.normal(size=(300, 16)), rng.normal(size=(200, 16)) * 1.3 + 0.2
    stats = {}
    for convention in (PAPER, PYTORCH_FID, None):
        for name, data in (("x", x), ("y", y)):
            acc = FeatureAccumulator(16)
            acc.update(torch.from_numpy(data))
            stats[convention, name] = FeatureStats.from_accumulator(acc, {"convention": convention} if convention
                                                                    else {})
    a, b = stats[PYTORCH_FID, "x"], stats[PYTORCH_FID, "y"]
    assert a.fid(b) == calculate_frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
    generic = stats[None, "x"].fid(stats[None, "y"])
    assert generic == pytest.approx(a.fid(b), rel=1e-9)
    real = torch.from_numpy(y)
    fake = torch.from_numpy(x)
    expected = _compute_fid(real.mean(0), torch.cov(real.T), fake.mean(0), torch.cov(fake.T))
    assert stats[PAPER, "x"].fid(stats[PAPER, "y"]) == pytest.approx(float(expected), rel=1e-6)
    assert stats[PAPER, "x"].fid(stats[PAPER, "y"]) == pytest.approx(generic, rel=1e-5)


@torch.no_grad()
def test_paper_statistics_files_are_the_official_codes(fid_weights, tmp_path):
    """Written → read → the same FID; a state dict made by torchmetrics itself (prepare_fid_stats.py's way) loads;
    the official code loads ours and its compute() gives our FID."""
    weights = str(fid_weights / WEIGHTS[PAPER].name)
    net = load_fid_network(str(fid_weights), PAPER)
    g = torch.Generator().manual_seed(3)
    # few images (each costs the full-size Inception ~0.3 s here, and passes through it up to three times): what is
    # compared is the files and the arithmetic, for any count; real and fake counts differ to tell them apart
    real = torch.randint(0, 256, (5, 1, 8, 8), generator=g).float() / 255 * 2 - 1
    fake = (torch.randint(0, 200, (4, 1, 8, 8), generator=g).float() / 255 * 2 - 1) * 1.1

    def stats_of(images):
        acc = FeatureAccumulator(net.feature_dim)
        acc.update(net.features(images))
        return FeatureStats.from_accumulator(acc, {"convention": PAPER, "network": net.identity})

    ours, samples = stats_of(real), stats_of(fake)
    path = save_stats(ours, tmp_path / "digits_8_fid_stats.pth", net.stats_state())
    back = load_stats(path)
    assert back.convention == PAPER and back.n == 5 and back.meta["network"] == net.identity
    assert back.meta["weights_digest"] == net.weights_digest
    np.testing.assert_array_equal(back.feature_sum, ours.feature_sum)
    np.testing.assert_array_equal(back.cov_sum, ours.cov_sum)
    fid = samples.fid(back)  # (each FID at 2048 dimensions takes the CPU ~20 s: as few as possible here)
    assert fid > 0
    # prepare_fid_stats.py: update(0.5 * (x + 1), real=True), then torch.save(fid.state_dict())
    official = OfficialFID(reset_real_features=False, normalize=True, feature_extractor_weights_path=weights,
                           **official_resize())  # the resize of the official code's torchmetrics 1.6
    official.update((0.5 * (real + 1)).repeat(1, 3, 1, 1), real=True)
    torch.save(official.state_dict(), tmp_path / "official.pth")
    theirs = load_stats(tmp_path / "official.pth")
    assert theirs.convention == PAPER and theirs.n == 5
    assert theirs.meta == {"convention": PAPER, "weights_digest": net.weights_digest}  # it holds the weights
    np.testing.assert_array_equal(theirs.feature_sum, ours.feature_sum)
    np.testing.assert_array_equal(theirs.cov_sum, ours.cov_sum)
    assert check_comparable(theirs, network=net.identity, feature_dim=2048, image_shape=None, convention=PAPER,
                            weights_digest=net.weights_digest) == []
    with pytest.raises(FIDError, match="computed with other Inception weights"):
        check_comparable(theirs, network="x", feature_dim=2048, image_shape=None, weights_digest="0123")
    bare = {k: v for k, v in official.state_dict().items() if not k.startswith("inception.")}
    torch.save(bare, tmp_path / "bare.pth")  # without the weights: usable, nothing to check
    assert "no provenance" in check_comparable(load_stats(tmp_path / "bare.pth"), network=net.identity,
                                               feature_dim=2048, image_shape=None, convention=PAPER)[0]
    # evaluate_fid.py: load_state_dict(torch.load(stats file)), update(0.5 * (clip(samples) + 1), real=False)
    official = OfficialFID(reset_real_features=False, normalize=True, feature_extractor_weights_path=weights,
                           **official_resize())
    official.load_state_dict(torch.load(path, map_location="cpu", weights_only=False))
    official.update((0.5 * (fake.clip(-1, 1) + 1)).repeat(1, 3, 1, 1), real=False)
    assert float(official.compute()) == pytest.approx(fid, rel=1e-5)
    # a plain torchmetrics metric with persistent states: its state dict loads as well
    plain = FrechetInceptionDistance(normalize=True, feature_extractor_weights_path=weights, **official_resize())
    plain.persistent(True)
    plain.update((0.5 * (real + 1)).repeat(1, 3, 1, 1), real=True)
    torch.save(plain.state_dict(), tmp_path / "plain.pth")
    np.testing.assert_array_equal(load_stats(tmp_path / "plain.pth").feature_sum, ours.feature_sum)
