"""Grid axes besides sizes × budgets × seeds (e.g. a noise-level ablation over train.noise_std), their results and
report; and an FID per point (`fid:` in the study), with the random stand-in network (plumbing, not FID values)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from scaling.plan import plan_study
from scaling.results import PointResult, format_grid_summary, grid_summary, markdown_table, read_csv, write_csv
from scaling.spec import StudyError
from scaling.validate import study_from_dict
from tarflow.main import main
from trainer.config import load_config

REPO = Path(__file__).resolve().parents[1]
DIGITS = str(REPO / "configs" / "digits.yaml")


def spec(**kw) -> dict:
    base = {"name": "t", "config": DIGITS, "sizes": [{"name": "c16", "channels": 16, "head_dim": 16}],
            "overrides": ["train.noise=gaussian"], "budgets": [{"steps": 10}],
            "grid": {"train.noise_std": [0.05, 0.2]}, "warmup_fraction": 0.1}
    return {**base, **kw}


# ---------------------------------------------------------------- planning
def test_a_grid_multiplies_sizes_budgets_and_seeds_and_names_every_point(tmp_path):
    s = study_from_dict(spec(sizes=[{"name": "c16", "channels": 16, "head_dim": 16},
                                    {"name": "c32", "channels": 32, "head_dim": 16}],
                             budgets=[{"steps": 10}, {"steps": 20}], seeds=[0, 1],
                             grid={"train": {"noise_std": [0.2, 0.05]}, "optim.lr": [1.0e-3]}))
    assert s.grid == {"train.noise_std": [0.2, 0.05], "optim.lr": [1.0e-3]}  # nested mappings flattened
    points = plan_study(s, tmp_path)
    assert len(points) == 2 * 2 * 2 * 2
    by_name = {p.name: p for p in points}
    p = by_name["c32-steps20-noise_std0.05-lr0.001-s1"]
    assert p.grid == {"train.noise_std": 0.05, "optim.lr": 0.001}
    cfg = load_config(p.argv[0], p.argv[1:])
    assert (cfg.train.noise, cfg.train.noise_std, cfg.optim.lr, cfg.train.steps, cfg.train.seed) == (
        "gaussian", 0.05, 0.001, 20, 1)
    assert (cfg.train.precision, cfg.eval.max_images) == ("fp32", 0)
    assert "train.noise=uniform" not in p.argv  # the study chose the training noise
    # within a size and budget, grid values in increasing order, then seeds
    first = [q.name for q in points[:4]]
    assert first == ["c16-steps10-noise_std0.05-lr0.001-s0", "c16-steps10-noise_std0.05-lr0.001-s1",
                     "c16-steps10-noise_std0.2-lr0.001-s0", "c16-steps10-noise_std0.2-lr0.001-s1"]


def test_without_a_grid_or_a_noise_choice_the_points_are_as_before(tmp_path):
    s = study_from_dict(spec(grid=None, overrides=[]))
    (p,) = plan_study(s, tmp_path)
    assert p.name == "c16-steps10-s0" and p.grid == {}
    assert p.argv[-5:-2] == ["train.noise=uniform", "train.precision=fp32", "eval.max_images=0"]


def test_grid_keys_that_end_alike_are_named_in_full(tmp_path):
    s = study_from_dict(spec(grid={"optim.lr": [0.001], "train.lr": [1]}, overrides=[]), source="s.yaml")
    with pytest.raises(StudyError, match=r"grid.train.lr: 1: .*unknown config key 'train.lr'"):
        plan_study(s, tmp_path)
    s = study_from_dict(spec(grid={"optim.lr": [0.001, 0.002], "train.label_drop": [0.1]}))
    assert [p.name for p in plan_study(s, tmp_path)] == ["c16-steps10-lr0.001-label_drop0.1-s0",
                                                          "c16-steps10-lr0.002-label_drop0.1-s0"]


@pytest.mark.parametrize("grid, message", [
    ({"noise_std": [0.1]}, "grid.noise_std: give the full config key (section.key), e.g. train.noise_std"),
    ({"train.noise_std": []}, "grid.train.noise_std: give at least one value"),
    ({"train.noise_std": [0.1, 0.1]}, "grid.train.noise_std: has duplicates"),
    ({"train.noise_std": [[0.1]]}, "values must be numbers, strings or booleans"),
    ({"train.seed": [1, 2]}, "grid.train.seed: train.seed is set per point by seeds:"),
    ({"train.steps": [5]}, "train.steps is set per point by budgets:"),
    ({"train.precision": ["bf16"]}, "every point runs with train.precision=fp32"),
    ({"model.channels": [8, 16]}, "model sizes are an axis of their own: use sizes:"),
    ({"train.noise": ["gaussian"]}, "grid.train.noise: train.noise is also set in overrides"),
    ({"train.noise_sdt": [0.1]}, "grid.train.noise_sdt: 0.1: unknown config key 'train.noise_sdt'"),
    ({"train.noise_std": [0.1, -0.2]}, "grid.train.noise_std: -0.2: train.noise_std: must be > 0"),
    ({"train.noise_std": [0.1, 0.1000000001]}, "give the same point name part 'noise_std0.1'"),
    ([0.1], "grid must map config keys to lists of values"),
])
def test_grid_errors_name_the_key(grid, message, tmp_path):
    with pytest.raises(StudyError) as e:
        plan_study(study_from_dict(spec(grid=grid), source="s.yaml"), tmp_path)
    assert message in str(e.value) and str(e.value).startswith("s.yaml: ")


def test_a_noise_grid_without_gaussian_noise_is_an_error(tmp_path):
    with pytest.raises(StudyError, match="every point trains with train.noise=uniform.*add train.noise=gaussian"):
        plan_study(study_from_dict(spec(overrides=[])), tmp_path)
    # the noise kind itself may be a grid axis
    s = study_from_dict(spec(overrides=[], grid={"train.noise": ["uniform", "gaussian"]}))
    assert [p.name for p in plan_study(s, tmp_path)] == ["c16-steps10-noiseuniform-s0",
                                                         "c16-steps10-noisegaussian-s0"]


@pytest.mark.parametrize("fid, message", [
    ({"num_samples": 0}, "fid.num_samples: must be >= 1"),
    ({"split": "test"}, "fid.split: must be train or heldout"),
    ({"metric": "kid"}, "fid.metric: must be fid, quality or fid"),
    ({"samples": 10}, "unknown config key 'fid.samples' (from the study); did you mean 'fid.num_samples'?"),
    ("tiny-random", "'fid' is a section"),
])
def test_fid_section_errors(fid, message):
    with pytest.raises(StudyError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        study_from_dict(spec(fid=fid), source="s.yaml")


# ---------------------------------------------------------------- results: CSV, tables, per grid value
def _result(name, noise, seed, bpd, fid=None, network="", **kw) -> PointResult:
    return PointResult(name=name, params_total=1000, params_no_embed=900, train_flops=1e9, train_steps=10,
                       images_seen=1280, seed=seed, bits_per_dim=bpd, wall_seconds=1.5, fid=fid, fid_network=network,
                       grid={"train.noise_std": noise}, **kw)


def test_grid_values_and_fid_round_trip_through_csv_and_old_files_still_read(tmp_path):
    results = [_result("a-s0", 0.05, 0, 6.0, 12.5, "tiny-random:0 (random)"), _result("a-s1", 0.05, 1, 6.2),
               _result("b-s0", 0.2, 0, None, status="failed", error="exit 1: boom")]
    write_csv(results, tmp_path / "results.csv")
    header = (tmp_path / "results.csv").read_text().splitlines()[0].split(",")
    assert header[header.index("fid"):] == ["fid", "fid_network", "class_accuracy", "classifier_fd", "precision",
                                            "recall", "fid_raw", "class_accuracy_raw", "classifier_fd_raw",
                                            "precision_raw", "recall_raw", "weights", "train.noise_std"]
    assert read_csv(tmp_path / "results.csv") == results
    # results.csv written before FID and grids existed
    old = tmp_path / "old.csv"
    old.write_text("name,params_total,params_no_embed,train_flops,train_steps,images_seen,seed,bits_per_dim,"
                   "wall_seconds,status,attempts,error\n"
                   "c8-steps400-s0,8260,7420,38900000000.0,400,51200,0,6.51,54.9,ok,1,\n")
    (r,) = read_csv(old)
    assert r.fid is None and r.fid_network == "" and r.grid == {} and r.bits_per_dim == 6.51 and r.ok
    assert "FID" not in markdown_table([r])


def test_per_grid_value_means_with_the_seed_spread_and_the_plumbing_mark():
    net = "tiny-random:0 (random weights)"
    results = [_result("a-s0", 0.05, 0, 6.0, 10.0, net), _result("a-s1", 0.05, 1, 6.2, 14.0, net),
               _result("b-s0", 0.4, 0, 7.0, 30.0, net), _result("b-s1", 0.4, 1, None, status="failed", error="x")]
    rows = grid_summary(results)
    assert [r.grid for r in rows] == [{"train.noise_std": 0.05}, {"train.noise_std": 0.4}]
    a, b = rows
    assert a.seeds == [0, 1] and math.isclose(a.bits_per_dim, 6.1) and math.isclose(a.bits_per_dim_std, 0.02 ** 0.5)
    assert math.isclose(a.fid, 12.0) and a.fid_n == 2
    assert b.seeds == [0] and b.bits_per_dim == 7.0 and b.bits_per_dim_std is None and b.failed == 1
    text = format_grid_summary(results, markdown=True)
    assert text.splitlines()[0] == "| noise_std | seeds | bits/dim (mean ± sd) | min | max | FID† (mean ± sd) |"
    assert "| 0.05 | 2 | 6.1000 ± 0.1414 | 6.0000 | 6.2000 | 12 ± 2.828 |" in text
    assert "plumbing only (random network)" in text
    table = markdown_table(results)
    assert "| noise_std | seed | bits/dim | FID† |" in table and "plumbing only (random network)" in table


# ---------------------------------------------------------------- end to end: a tiny noise study with FID
# (18 held-out digits: the FID reference goes through the full-size Inception, ~0.3 s per image on this CPU)
TINY = """
name: tiny_noise
config: {config}
overrides: [train.noise=gaussian, train.global_batch=32, train.micro_batch=32, eval.at_start=false, eval.every=0,
            sample.num=1, sample.denoise=false, logging.every=5, model.num_blocks=2, model.layers_per_block=1,
            model.head_dim=8, data.heldout_fraction=0.01]
warmup_fraction: 0.2
sizes: [{{name: xs, channels: 8}}]
budgets: [{{steps: 6}}]
grid: {{train.noise_std: [0.05, 0.5]}}
fid: {{num_samples: 4, inception: "tiny-random", split: heldout, batch_size: 4}}
"""


@pytest.fixture(scope="module")
def noise_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("grid")
    path = root / "tiny.yaml"
    path.write_text(TINY.format(config=DIGITS))
    directory = root / "study"
    rc = main(["scale", "run", str(path), "--dir", str(directory)])
    return path, directory, rc


def test_a_tiny_noise_study_runs_end_to_end_with_a_row_per_grid_value_and_an_fid(noise_study, capsys):
    path, directory, rc = noise_study
    assert rc == 0
    results = {r.name: r for r in read_csv(directory / "results.csv")}
    assert set(results) == {"xs-steps6-noise_std0.05-s0", "xs-steps6-noise_std0.5-s0"}
    for name, sigma in (("xs-steps6-noise_std0.05-s0", 0.05), ("xs-steps6-noise_std0.5-s0", 0.5)):
        r = results[name]
        assert r.ok and r.grid == {"train.noise_std": sigma} and 0 < r.bits_per_dim < 30
        assert r.fid is not None and math.isfinite(r.fid) and r.fid >= 0 and r.fid_plumbing
        config = (directory / "points" / name / "config.yaml").read_text()
        assert "noise: gaussian" in config and f"noise_std: {sigma}" in config
        fid = json.loads((directory / "points" / name / "fid" / "results.json").read_text())
        assert fid["num_samples"] == 4 and fid["results"][0]["denoise"] is True
    assert len(list((directory / "fid").glob("reference-heldout-*.pth"))) == 1  # the paper convention's format
    fit = json.loads((directory / "fit.json").read_text())
    assert fit["fits"] == {} and "L(N)" not in fit["skipped"]  # one size, one budget: per grid value only
    assert [row["grid"] for row in fit["grid"]["rows"]] == [{"train.noise_std": 0.05}, {"train.noise_std": 0.5}]
    assert "plumbing only (random network)" in fit["grid"]["fid_note"]
    assert Path(fit["grid"]["plot"]).name == "grid_noise_std.png"
    assert Path(fit["grid"]["plot"]).read_bytes()[:4] == b"\x89PNG"
    assert main(["scale", "report", str(directory)]) == 0
    out = capsys.readouterr().out
    assert "Per grid value (noise_std)" in out and "FID†" in out and "plumbing only (random network)" in out


def test_running_it_again_trains_and_evaluates_nothing(noise_study, capsys):
    path, directory, _ = noise_study
    logs = {p.name: (p / "fid.log").read_text().count("\n=== ") for p in (directory / "points").iterdir()}
    assert set(logs.values()) == {1}
    assert main(["scale", "run", str(path), "--dir", str(directory), "--no-fit"]) == 0
    out = capsys.readouterr().out
    assert "] attempt " not in out and "] FID " not in out
    assert {p.name: (p / "fid.log").read_text().count("\n=== ") for p in (directory / "points").iterdir()} == logs


def test_missing_inception_weights_fail_the_study_before_anything_trains(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text(TINY.format(config=DIGITS).replace('"tiny-random"', str(tmp_path / "nope.pth")))
    assert main(["scale", "run", str(path), "--dir", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "FID Inception weights not found" in err and "weights-inception-2015-12-05-6726825d.pth" in err
    assert not (tmp_path / "d" / "points").exists()


def test_a_study_can_ask_for_the_offline_classifier_metrics_per_point(tmp_path, capsys):
    """`fid: {metric: quality}`: no Inception weights; the classifier is trained once into the study directory.
    `denoise: both`: the same draws scored with and without the denoising step; `method: jacobi`: the samples
    come from the parallel inversion, and the results say so."""
    path = tmp_path / "q.yaml"
    path.write_text(TINY.format(config=DIGITS).replace("[0.05, 0.5]", "[0.05]").replace(
        'num_samples: 4, inception: "tiny-random", split: heldout, batch_size: 4',
        "metric: quality, num_samples: 10, batch_size: 10, denoise: both, method: jacobi, tol: 0.001"))
    argv = ["scale", "run", str(path), "--dir", str(tmp_path / "study"), "--no-fit"]
    assert main(argv) == 0
    (r,) = read_csv(tmp_path / "study" / "results.csv")
    assert r.ok and r.fid is None and r.error == "" and r.classifier_fd > 0
    assert 0 <= r.class_accuracy <= 1 and 0 <= r.precision <= 1 and 0 <= r.recall <= 1
    assert r.classifier_fd_raw > 0 and r.classifier_fd_raw != r.classifier_fd and r.fid_raw is None
    rows = json.loads((tmp_path / "study" / "points" / r.name / "fid" / "results.json").read_text())["results"]
    assert [row["denoise"] for row in rows] == [False, True]
    assert {(row["method"], row["tol"]) for row in rows} == {("jacobi", 0.001)}
    assert (r.classifier_fd_raw, r.classifier_fd) == (rows[0]["classifier_fd"], rows[1]["classifier_fd"])
    assert len(list((tmp_path / "study" / "fid").glob("classifier-digits-*.pt"))) == 1
    request = json.loads((tmp_path / "study" / "points" / r.name / "fid" / "request.json").read_text())
    assert request["argv"][1:3] == ["--metric", "quality"] and "--classifier" in request["argv"]
    assert "--inception" not in request["argv"] and request["classifier_sha1"]
    assert request["argv"][request["argv"].index("--denoise") + 1] == "both"
    assert request["argv"][request["argv"].index("--method"):][:4] == ["--method", "jacobi", "--tol", "0.001"]
    out = capsys.readouterr().out
    assert f"[{r.name}] class accuracy " in out and "; without the denoising step: class accuracy " in out
    assert main(["scale", "report", str(tmp_path / "study")]) == 0
    report = capsys.readouterr().out
    assert "cls FD" in report and "cls FD, no denoise" in report
    assert main(argv) == 0  # again: nothing to train or evaluate
    out = capsys.readouterr().out
    assert "] attempt " not in out and "] class accuracy " not in out and "classifier of the" not in out
