"""Scaling-study results: CSV round trip, tables, and which points reach a fit."""

import random

import numpy as np
import pytest

from scaling.fit import fit_scaling_law
from scaling.results import (
    PointResult,
    format_grid_summary,
    format_table,
    grid_summary,
    markdown_table,
    read_csv,
    to_points,
    write_csv,
)


def point(name, params, flops, seed, bpd, *, status="ok", error="", attempts=1) -> PointResult:
    return PointResult(name=name, params_total=params, params_no_embed=params - 1000, train_flops=flops,
                       train_steps=int(flops // 1e6), images_seen=int(flops // 1e4), seed=seed, bits_per_dim=bpd,
                       wall_seconds=12.5 + seed, status=status, attempts=attempts, error=error)


def study() -> list[PointResult]:
    results = []
    for params, base in ((1_000_000, 2.0), (100_000, 2.5), (10_000, 3.1)):
        for flops in (1e12, 1e11):
            for seed in (1, 0):
                results.append(point(f"n{params}-c{flops:.0e}-s{seed}", params, flops, seed,
                                     base + (0.2 if flops < 1e12 else 0.0) + 0.01 * seed))
    results.append(point("n300000-c1e12-s0", 300_000, 1e12, 0, None, status="failed", attempts=3,
                         error="RuntimeError: CUDA out of memory, tried to allocate 2 GiB | retry"))
    return results


def test_csv_round_trip_is_exact(tmp_path):
    awkward = [
        point("a", 123_456_789, 0.1 + 0.2, 0, 1 / 3),
        point("b, with comma", 7, 1.2345678901234567e15, 42, 2.718281828459045e-7, attempts=2),
        point("c", 8, 3e18, 1, None, status="failed", attempts=3,
              error='Traceback:\n  "quoted", commas, and ünïcode\nValueError: boom'),
    ]
    path = tmp_path / "results.csv"
    write_csv(awkward, path)
    back = read_csv(path)
    assert back == awkward
    assert isinstance(back[0].params_total, int) and back[2].bits_per_dim is None
    assert all(PointResult.from_dict(r.to_dict()) == r for r in awkward)


def test_read_csv_names_missing_columns(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("name,params_total\nx,1\n")
    with pytest.raises(ValueError, match="missing column"):
        read_csv(path)


def test_status_is_checked():
    with pytest.raises(ValueError, match="status"):
        point("x", 1, 1.0, 0, 1.0, status="done")


def _names_in_order(table: str, results) -> list[str]:
    names = {r.name for r in results}
    return [line.split()[0] for line in table.splitlines() if line.split() and line.split()[0] in names]


def test_table_sorted_by_size_then_budget_then_seed():
    results = study()
    random.Random(0).shuffle(results)
    expected = [r.name for r in sorted(results, key=lambda r: (r.params_total, r.train_flops, r.seed))]
    assert expected[:4] == ["n10000-c1e+11-s0", "n10000-c1e+11-s1", "n10000-c1e+12-s0", "n10000-c1e+12-s1"]
    table = format_table(results)
    assert _names_in_order(table, results) == expected
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["point", "params", "non-emb"]
    assert set(lines[1]) <= {"-", " "}
    assert len({len(line) for line in lines[: 2 + len(results)]}) == 1  # fixed width


def test_failed_points_shown_as_failed():
    table = format_table(study())
    row = next(line for line in table.splitlines() if line.startswith("n300000"))
    assert "failed" in row.split() and "—" in row.split() and row.split()[-1] == "3"
    assert "n300000-c1e12-s0: failed after 3 attempt(s): RuntimeError: CUDA out of memory" in table
    md = markdown_table(study())
    lines = md.splitlines()
    assert lines[0].startswith("| point | params |") and lines[1].startswith("|---|---:")
    assert sum(line.startswith("| n") for line in lines) == len(study())
    failed_row = next(line for line in lines if line.startswith("| n300000"))
    assert "| failed |" in failed_row and "| — |" in failed_row
    assert "retry" in md and "\\| retry" in md  # a pipe in an error message does not break the table


def test_failed_points_excluded_from_fits():
    results = study()
    results.append(point("nan-run", 50_000, 1e12, 0, float("nan")))  # "ok" with a non-finite loss: also left out
    points = to_points([r for r in results if r.train_flops == 1e12])
    assert len(points) == 6 and np.all(np.isfinite(points.loss))
    assert 300_000 not in points.x and 50_000 not in points.x
    fit = fit_scaling_law(points, n_boot=20)
    assert fit.n_points == 6
    compute = to_points(results, x="train_flops")
    assert set(compute.x.tolist()) == {1e11, 1e12} and compute.size is not None
    with pytest.raises(ValueError, match="numeric field"):
        to_points(results, x="status")


# ---------------------------------------------------------------- sample metrics, with and without denoising
def _scored(seed, noise, acc, acc_raw, fd, fd_raw) -> PointResult:
    return PointResult(name=f"c8-{noise}-s{seed}", params_total=8000, params_no_embed=7000, train_flops=1e9,
                       train_steps=10, images_seen=1280, seed=seed, bits_per_dim=5.0 + seed, wall_seconds=1.0,
                       class_accuracy=acc, class_accuracy_raw=acc_raw, classifier_fd=fd, classifier_fd_raw=fd_raw,
                       precision=0.5, recall=0.25, precision_raw=0.4, recall_raw=0.2, grid={"noise": noise})


def test_classifier_metrics_with_and_without_denoising_reach_the_tables_and_the_per_set_means(tmp_path):
    results = [_scored(0, "uniform", 0.30, 0.20, 10.0, 14.0), _scored(1, "uniform", 0.40, 0.30, 12.0, 18.0),
               _scored(0, "sigma0.1", 0.5, 0.1, 5.0, 50.0)]
    write_csv(results, tmp_path / "r.csv")
    assert read_csv(tmp_path / "r.csv") == results  # a named-set axis ("noise") round-trips as a grid column
    table = markdown_table(results)
    assert ("| noise | seed | bits/dim | class acc | cls FD | precision | recall | class acc, no denoise | "
            "cls FD, no denoise | precision, no denoise | recall, no denoise |") in table
    assert "| 0.300 | 10 | 0.500 | 0.250 | 0.200 | 14 | 0.400 | 0.200 |" in table
    # names in the order the study gives them (uniform first), not alphabetically
    assert [r.grid["noise"] for r in grid_summary(results)] == ["uniform", "sigma0.1"]
    assert table.index("| c8-uniform-s1 |") < table.index("| c8-sigma0.1-s0 |")
    rows = {r.grid["noise"]: r for r in grid_summary(results)}
    assert rows["uniform"].metric("class_accuracy") == (pytest.approx(0.35), pytest.approx(0.0707107), 2)
    assert rows["uniform"].metric("classifier_fd_raw")[0] == pytest.approx(16.0)
    assert rows["sigma0.1"].metric("class_accuracy_raw") == (pytest.approx(0.1), None, 1)
    summary = format_grid_summary(results, markdown=True)
    assert "| uniform | 2 | 5.5000 ± 0.7071 | 5.0000 | 6.0000 | 0.350 ± 0.071 | 11 ± 1.414 |" in summary
    assert rows["uniform"].fid is None and "FID" not in table  # no FID asked for: no FID column
