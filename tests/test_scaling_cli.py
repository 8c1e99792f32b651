"""`tarflow scale run|fit|report` end to end with the real trainer: a tiny study of three sizes on the digits set
(plus a size that fails at run time), its results, fit, plot and report, and a second run that launches nothing."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from scaling.results import read_csv
from tarflow.main import main

REPO = Path(__file__).resolve().parents[1]

TINY = """
name: tiny
config: {config}
overrides: [train.global_batch=32, train.micro_batch=32, eval.at_start=false, eval.every=0, sample.num=1,
            sample.denoise=false, logging.every=5, model.num_blocks=2, model.layers_per_block=1, model.head_dim=8]
warmup_fraction: 0.2
sizes:
  - {{name: xs, channels: 8}}
  - {{name: s, channels: 16}}
  - {{name: m, channels: 32}}
  - {{name: broken, channels: 16, overrides: [model.num_classes=3]}}   # the data has 10 classes: fails at launch
budgets: [{{steps: 10}}]
run: {{max_retries: 1}}
fit: {{n_boot: 40}}
"""


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """One real run of the study (module-scoped: the tests below read what it left)."""
    root = tmp_path_factory.mktemp("scale")
    path = root / "tiny.yaml"
    path.write_text(TINY.format(config=REPO / "configs" / "digits.yaml"))
    directory = root / "study"
    rc = main(["scale", "run", str(path), "--dir", str(directory)])
    return path, directory, rc


def test_a_tiny_study_runs_every_point_and_reports_the_failure(study, capsys):
    path, directory, rc = study
    assert rc == 1  # a point failed: the study finished, and says so
    results = {r.name: r for r in read_csv(directory / "results.csv")}
    assert set(results) == {"xs-steps10-s0", "s-steps10-s0", "m-steps10-s0", "broken-steps10-s0"}
    ok = [results[n] for n in ("xs-steps10-s0", "s-steps10-s0", "m-steps10-s0")]
    assert all(r.status == "ok" and r.attempts == 1 and r.train_steps == 10 and r.images_seen == 320 for r in ok)
    assert ok[0].params_total < ok[1].params_total < ok[2].params_total
    for r in ok:
        metrics = [json.loads(line) for line in
                   (directory / "points" / r.name / "metrics.jsonl").read_text().splitlines()]
        logged = next(m for m in metrics if "model/parameters" in m)
        assert r.params_total == logged["model/parameters"]
        assert r.train_flops == logged["model/train_flops_per_image"] * 320
        summary = json.loads((directory / "points" / r.name / "summary.json").read_text())
        assert r.bits_per_dim == summary["final_bits_per_dim"] and 0 < r.bits_per_dim < 12
        config = (directory / "points" / r.name / "config.yaml").read_text()
        assert "noise: uniform" in config and "precision: fp32" in config and "max_images: 0" in config
    broken = results["broken-steps10-s0"]
    assert broken.status == "failed" and broken.attempts == 2 and broken.bits_per_dim is None
    assert "model.num_classes=3 but the data has 10 classes" in broken.error

    fit = json.loads((directory / "fit.json").read_text())
    law = fit["fits"]["L(N)"]
    assert law["n_points"] == 3 and law["alpha"] > 0 and fit["x"] == "params_no_embed"
    assert Path(law["plot"]).is_file() and Path(law["plot"]).read_bytes()[:4] == b"\x89PNG"

    assert main(["scale", "report", str(directory)]) == 0
    out = capsys.readouterr().out
    assert "xs-steps10-s0" in out and "L(N): L = " in out and "broken-steps10-s0: failed after 2 attempt(s)" in out


def test_running_the_study_again_launches_nothing(study, capsys):
    path, directory, _ = study
    points = sorted((directory / "points").iterdir())
    mtimes = {p.name: (p / "summary.json").stat().st_mtime_ns for p in points if (p / "summary.json").exists()}
    state = json.loads((directory / "state.json").read_text())["points"]
    assert main(["scale", "run", str(path), "--dir", str(directory), "--no-fit"]) == 1
    out = capsys.readouterr().out
    assert "] attempt " not in out and "retries used up" in out
    assert {p.name: (p / "summary.json").stat().st_mtime_ns for p in points if (p / "summary.json").exists()} == mtimes
    after = json.loads((directory / "state.json").read_text())["points"]
    assert {n: s["attempts"] for n, s in after.items()} == {n: s["attempts"] for n, s in state.items()}


def test_fit_again_with_other_settings_and_markdown_report(study, capsys):
    _, directory, _ = study
    assert main(["scale", "fit", str(directory), "--x", "params_total", "--n-boot", "20"]) == 0
    out = capsys.readouterr().out
    assert "L(N): L = " in out and "N = params_total" in out
    assert json.loads((directory / "fit.json").read_text())["fits"]["L(N)"]["n_boot"] <= 20
    assert main(["scale", "report", str(directory), "--markdown"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| point | params |") and "- L(N): L = " in out


def test_errors_are_reported_as_such(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(textwrap.dedent("""
        name: bad
        sizes: {chanels: [8]}
    """))
    assert main(["scale", "run", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'sizes.chanels' (from the study); did you mean 'sizes.channels'?" in err
    assert main(["scale", "fit", str(tmp_path)]) == 2
    assert "no results.csv" in capsys.readouterr().err


def test_a_dry_run_prints_the_plan_and_runs_nothing(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text(TINY.format(config=REPO / "configs" / "digits.yaml"))
    assert main(["scale", "run", str(path), "--dir", str(tmp_path / "d"), "--dry-run", "--where", "slurm"]) == 0
    out = capsys.readouterr().out
    assert "xs-steps10-s0" in out and "#SBATCH --array=0-3" in out and not (tmp_path / "d").exists()


def test_fit_from_a_results_csv_with_sizes_and_budgets_gives_l_of_n_per_budget_and_the_frontier(tmp_path, capsys):
    """No plan (results copied from elsewhere): budgets are told apart by steps. Synthetic points from
    L = 1 + 30·N^−0.3 + 60·D^−0.3 (D = images seen), 4 sizes × 3 budgets."""
    from scaling.results import PointResult, write_csv

    results = []
    for n in (1e4, 4e4, 1.6e5, 6.4e5):
        for steps in (100, 400, 1600):
            images = steps * 128
            results.append(PointResult(name=f"n{n:.0f}-steps{steps}-s0", params_total=int(n), params_no_embed=int(n),
                                       train_flops=6 * n * images, train_steps=steps, images_seen=images, seed=0,
                                       bits_per_dim=1 + 30 * n ** -0.3 + 60 * images ** -0.3, wall_seconds=1.0))
    write_csv(results, tmp_path / "results.csv")
    assert main(["scale", "fit", str(tmp_path), "--n-boot", "30"]) == 0
    fit = json.loads((tmp_path / "fit.json").read_text())
    assert sorted(fit["fits"]) == ["L(C)", "L(N) steps100", "L(N) steps1600", "L(N) steps400"]
    assert fit["fits"]["L(C)"]["on"] == "compute-optimal frontier" and len(fit["frontier"]["frontier"]) >= 3
    assert all(fit["fits"][k]["monotone"] for k in fit["fits"])
    assert {Path(p).name for p in fit["plots"]} == {"L_N_steps100.png", "L_N_steps400.png", "L_N_steps1600.png",
                                                   "frontier.png"}
    out = capsys.readouterr().out
    assert "L(C): L = " in out and "C^−" in out and "on the compute-optimal frontier" in out
