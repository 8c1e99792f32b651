"""Scaling plots are written as PNGs of the expected pixel size, without a display."""

import numpy as np
import pytest
from PIL import Image

from scaling.fit import Points, compute_frontier, fit_scaling_law
from scaling.plot import grid_panels, law_label, plot_fit, plot_frontier, plot_grid


@pytest.fixture(scope="module")
def size_points() -> Points:
    rng = np.random.default_rng(0)
    x = np.repeat(np.geomspace(1e3, 1e6, 5), 2)
    loss = (1.0 + 30 * x ** -0.35) * np.exp(0.01 * rng.standard_normal(len(x)))
    return Points(x=x, loss=loss, seed=np.tile([0, 1], 5))


@pytest.fixture(scope="module")
def compute_points() -> Points:
    rng = np.random.default_rng(1)
    C, L, N, S = [], [], [], []
    for n in (1e3, 1e4, 1e5):
        for c in np.geomspace(1e9, 1e13, 5):
            tokens = c / (6 * n)
            for s in (0, 1):
                C.append(c), N.append(n), S.append(s)
                L.append((1.0 + 30 * n ** -0.35 + 50 * tokens ** -0.3) * np.exp(0.005 * rng.standard_normal()))
    return Points(x=C, loss=L, seed=S, size=N)


def assert_png(path, size):
    assert path.exists() and path.stat().st_size > 0
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == size


def test_plot_fit_png(tmp_path, size_points):
    fit = fit_scaling_law(size_points, n_boot=50)
    path = plot_fit(size_points, fit, tmp_path / "plots" / "fit_params.png", "parameters N", "digits")
    assert_png(path, (960, 720))
    small = plot_fit(size_points, fit, tmp_path / "small.png", figsize=(4, 3), dpi=100)
    assert_png(small, (400, 300))


def test_plot_fit_without_intervals(tmp_path, size_points):
    fit = fit_scaling_law(size_points, n_boot=0)
    assert "CI" not in law_label(fit)
    assert_png(plot_fit(size_points, fit, tmp_path / "fit.png"), (960, 720))


def test_law_label_has_values_and_intervals(size_points):
    fit = fit_scaling_law(size_points, n_boot=50)
    label = law_label(fit, "N")
    assert label.startswith("$L = ") and "N^{-" in label and "95% CI" in label and r"\alpha" in label


def test_plot_frontier_png(tmp_path, compute_points):
    frontier = compute_frontier(compute_points)
    fit = fit_scaling_law(frontier.points, n_boot=50, what="compute")
    assert_png(plot_frontier(compute_points, frontier, fit, tmp_path / "frontier.png"), (960, 720))
    assert_png(plot_frontier(compute_points, frontier, None, tmp_path / "frontier_nofit.png", dpi=100),
               (640, 480))


def test_plot_grid_draws_a_panel_per_sample_metric(tmp_path):
    from scaling.results import PointResult, grid_summary

    def scored(noise, seed, acc):
        return PointResult(name=f"{noise}-s{seed}", params_total=8000, params_no_embed=7000, train_flops=1e9,
                           train_steps=10, images_seen=1280, seed=seed, bits_per_dim=5.0 + seed, wall_seconds=1.0,
                           class_accuracy=acc, class_accuracy_raw=acc / 2, classifier_fd=1 / acc,
                           classifier_fd_raw=2 / acc, grid={"noise": noise})

    rows = grid_summary([scored(n, s, 0.2 + 0.1 * i + 0.01 * s) for i, n in enumerate(["uniform", "sigma0.1"])
                         for s in (0, 1)])
    assert [f for f, _ in grid_panels(rows)] == ["bits_per_dim", "class_accuracy", "classifier_fd"]
    assert [f for f, _ in grid_panels(grid_summary([PointResult(
        name="a", params_total=1, params_no_embed=1, train_flops=1.0, train_steps=1, images_seen=1, seed=0,
        bits_per_dim=5.0, wall_seconds=1.0, grid={"noise": "uniform"})]))] == ["bits_per_dim"]
    assert_png(plot_grid(rows, "noise", tmp_path / "grid.png", figsize=(9, 3), dpi=100), (900, 300))
