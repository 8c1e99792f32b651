"""``tarflow eval --metric fid`` and ``tarflow eval stats``: one process and two ranks (each convention), the paper
convention against torchmetrics' own single-process FID, and their errors.

Random weights in each library's own layout (``fid_weights``) stand in for the FID Inception weights: these tests
check the plumbing, not FID values (real numbers need the real weights)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torchmetrics.image.fid import FrechetInceptionDistance

from data_pipeline import build_loader
from tarflow.main import main
from tarflow_testing.evaluation import (
    SMALL_HELDOUT,
    checkpoint_and_reference,
    export,
    perturbed_model,
    random_weight_files,
)
from trainer.evaluation.fid import FeatureStats, load_stats, save_stats
from trainer.evaluation.inception import WEIGHTS, official_resize
from trainer.evaluation.reference import data_config_for

REPO = Path(__file__).resolve().parents[1]
OTHER_HELDOUT = [*SMALL_HELDOUT, "data.split_seed=1"]  # another 9 digits


@pytest.fixture(scope="module")
def files(tmp_path_factory, fid_weights):
    return checkpoint_and_reference(tmp_path_factory.mktemp("fid"), fid_weights)


# ---------------------------------------------------------------- the command
def run_json(capsys, args) -> dict:
    assert main(args) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def stats_args(files, out, convention="paper", data=SMALL_HELDOUT) -> list[str]:
    return ["eval", "stats", "digits", *data, "--split", "heldout", "--inception", files["weights"],
            "--fid-convention", convention, "--batch-size", "16", "--device", "cpu", "--out", str(out)]


def fid_args(files, out) -> list[str]:
    """(Each FID at 2048 dimensions costs this CPU ~20 s: one setting here; sweeps: test_evaluation_sweep.py.)"""
    return ["eval", files["ckpt"], "--metric", "fid", "--num-samples", "6", "--guidance", "1.5", "--annealed",
            "--denoise", "--inception", files["weights"], "--ref-stats", files["ref"], "--batch-size", "2",
            "--seed", "9", "--save-samples", "--device", "cpu", "--out", str(out)]


@pytest.fixture(scope="module")
def two_ranks(files):
    """torchrun, 2 ranks (gloo on loopback), in one launch: `eval stats` of two digit sets (paper), of one set
    (pytorch-fid), and an `eval --metric fid` (paper)."""
    from tarflow_testing.runs import torchrun

    root = files["root"] / "two_ranks"
    root.mkdir()
    commands = [stats_args(files, root / "a.pth"), stats_args(files, root / "b.pth", data=OTHER_HELDOUT),
                stats_args(files, root / "a.npz", "pytorch-fid"), fid_args(files, root / "two_fid")]
    (root / "commands.json").write_text(json.dumps(commands))
    torchrun([str(REPO / "tests" / "workers" / "tarflow_commands.py"), str(root / "commands.json")])
    return root


@torch.no_grad()
def test_two_ranks_equal_torchmetrics_single_process_fid(files, two_ranks):
    """Each rank feeds half of each set and the float64 sums are all-reduced; torchmetrics' FrechetInceptionDistance
    in one process, fed as evaluate_fid.py feeds it, on the same images: the same FID."""
    a, b = load_stats(two_ranks / "a.pth"), load_stats(two_ranks / "b.pth")
    assert a.n == b.n == 9 and a.meta["ranks"] == 2 and a.convention == b.convention == "paper"
    metric = FrechetInceptionDistance(normalize=True, **official_resize(), feature_extractor_weights_path=str(
        Path(files["weights"]) / WEIGHTS["paper"].name))
    for data, real in ((SMALL_HELDOUT, True), (OTHER_HELDOUT, False)):
        for x, *_ in build_loader(data_config_for("digits", data), "heldout", 100, seed=0):
            metric.update((0.5 * (x.clip(-1, 1) + 1)).repeat(1, 3, 1, 1), real=real)
    # the same images through float32 convolutions in other batch sizes and threads: features agree to ~1e-6
    np.testing.assert_allclose(a.feature_sum, metric.real_features_sum.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a.cov_sum, metric.real_features_cov_sum.numpy(), rtol=1e-5, atol=1e-5)
    expected = float(metric.compute())
    assert expected > 0 and b.fid(a) == pytest.approx(expected, rel=1e-5)


def test_two_ranks_accumulate_the_same_statistics_as_one_process(files, two_ranks, tmp_path):
    """pytorch-fid convention: each rank reads half of the held-out digits; one process's statistics."""
    assert main(stats_args(files, tmp_path / "one.npz", "pytorch-fid")) == 0
    two, one = load_stats(two_ranks / "a.npz"), load_stats(tmp_path / "one.npz")
    assert two.n == one.n == 9
    assert two.meta["ranks"] == 2 and one.meta["ranks"] == 1 and one.convention == "pytorch-fid"
    assert two.meta["network"] == one.meta["network"] and two.meta["image_shape"] == [1, 8, 8]
    # the same images, in other batches (float32 convolutions) and another summation order: equal up to rounding
    assert np.linalg.norm(two.mu - one.mu) <= 1e-5 * np.linalg.norm(one.mu)
    assert np.linalg.norm(two.sigma - one.sigma) <= 1e-5 * np.linalg.norm(one.sigma)
    assert one.meta["dataset"] == {"format": "embedded", "source": "digits", "heldout_fraction": 0.005,
                                   "split_seed": 0, "resize": 0, "crop": 0}
    assert "pytorch-fid" in one.meta["preprocessing"] and "round" in one.meta["preprocessing"]
    assert "(x*255).byte()" in load_stats(two_ranks / "a.pth").meta["preprocessing"]


def test_fid_on_two_ranks_equals_one_process(files, two_ranks, tmp_path, capsys):
    """Each rank samples half of the 6 samples: the same draws, samples and FID as one process."""
    one = run_json(capsys, fid_args(files, tmp_path / "one"))
    two = json.loads((two_ranks / "two_fid" / "results.json").read_text())
    assert (one["ranks"], two["ranks"]) == (1, 2) and one["fid_convention"] == two["fid_convention"] == "paper"
    assert one["fid"] == one["results"][0]["fid"] > 0 and two["fid"] == pytest.approx(one["fid"], rel=1e-4)
    assert one["reference"]["convention"] == "paper" and one["results"][0]["denoise"] is True
    a, b = one["results"][0], two["results"][0]
    assert a["num_samples"] == b["num_samples"] == 6 and a["nan_redraws"] == b["nan_redraws"]
    assert b["sample_bits_per_dim"] == pytest.approx(a["sample_bits_per_dim"], rel=1e-3)
    assert b["heldout_bits_per_dim"] == pytest.approx(a["heldout_bits_per_dim"], rel=1e-3)
    name = "g1.5_t1_denoised"  # the setting's files: guidance 1.5, attention temperature 1, the denoising step
    d1, d2 = np.load(tmp_path / "one" / f"draws_{name}.npz"), np.load(two_ranks / "two_fid" / f"draws_{name}.npz")
    for key in ("index", "attempt", "seed"):
        np.testing.assert_array_equal(d1[key], d2[key])
    assert set(d2["index"].tolist()) == set(range(6))  # exactly the 6 samples, none twice
    assert len(set(d2["seed"].tolist())) == len(d2["seed"])  # no noise seed used twice on any rank
    assert (two_ranks / "two_fid" / f"preview_{name}.png").is_file()
    assert load_stats(two_ranks / "two_fid" / f"samples_{name}_stats.pth").n == 6
    saved = np.load(tmp_path / "one" / f"samples_{name}_rank00000.npz")
    assert saved["images"].shape == (6, 1, 8, 8) and saved["images"].dtype == np.uint8
    assert saved["indices"].tolist() == list(range(6)) and saved["labels"].tolist() == list(range(6))
    halves = [np.load(two_ranks / "two_fid" / f"samples_{name}_rank{r:05d}.npz") for r in (0, 1)]
    assert sorted(i for h in halves for i in h["indices"].tolist()) == list(range(6))


def test_bad_inputs_are_clear_errors(files, tmp_path, capsys, monkeypatch):
    fid = ["eval", files["ckpt"], "--metric", "fid", "--num-samples", "4", "--inception", files["weights"],
           "--device", "cpu"]

    def error(args) -> str:
        assert main(args) == 2
        return capsys.readouterr().err

    assert "needs --ref-stats FILE" in error(fid)
    assert "FID Inception weights not found" in error(
        [*fid[:-4], "--inception", str(tmp_path / "missing.pth"), "--ref-stats", files["ref"]])
    # the reference file holds the Inception weights it was made with (as the official files do): checked
    other = random_weight_files(tmp_path / "other-weights", seed=1)
    assert "were computed with other Inception weights" in error(
        [*fid[:-4], "--inception", str(other), "--ref-stats", files["ref"], "--device", "cpu"])
    assert "have 2048-d features but the Inception network gives 64-d ones" in error(
        [*fid[:-4], "--inception", "tiny-random:1", "--ref-stats", files["ref"], "--device", "cpu"])
    assert "are paper statistics but this evaluation uses the pytorch-fid convention" in error(
        [*fid, "--ref-stats", files["ref"], "--fid-convention", "pytorch-fid"])
    ref = load_stats(files["ref"])
    save_stats(FeatureStats(ref.mu, ref.sigma, ref.n, {**ref.meta, "image_shape": [3, 32, 32]}), tmp_path / "rgb.pth")
    assert "describe images of shape (3, 32, 32) but the checkpoint generates (1, 8, 8)" in error(
        [*fid, "--ref-stats", str(tmp_path / "rgb.pth")])
    # a checkpoint whose weights do not match its config
    other, _ = perturbed_model(["model.channels=64"])
    _, cfg = perturbed_model()
    export(other, cfg, tmp_path / "mismatch.pt")
    assert "has shape (16, 64) but the model expects (16, 32)" in error(
        ["eval", str(tmp_path / "mismatch.pt"), "--metric", "fid", "--num-samples", "4", "--inception",
         files["weights"], "--ref-stats", files["ref"], "--device", "cpu"])
    assert "a sweep (several --guidance / --attn-temp values)" in error(
        [*fid, "--ref-stats", files["ref"], "--guidance", "0", "1"])
    assert "--guidance applies to --metric fid only" in error(["eval", files["ckpt"], "--guidance", "1"])
    assert "--fid-convention applies to --metric fid only" in error(
        ["eval", files["ckpt"], "--fid-convention", "pytorch-fid"])
    assert "neither an embedded set" in error(["eval", "stats", str(tmp_path / "nodata"), "--out",
                                               str(tmp_path / "s.pth"), "--inception", "tiny-random"])
    assert "pytorch-fid statistics are a .npz file" in error(
        ["eval", "stats", "digits", "--out", str(tmp_path / "s.pth"), "--fid-convention", "pytorch-fid"])
    # N not divisible by the ranks: refused before any process group or sampling
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert "--num-samples 4 is not divisible by the 3 ranks" in error([*fid, "--ref-stats", files["ref"]])


def test_eval_stats_has_one_spelling_and_the_official_file_name(files, tmp_path, capsys):
    """`eval stats DATA_URI`; an embedded set by its name or as embedded:NAME, the same statistics; --out DIR: the
    official code's file name."""
    common = [*SMALL_HELDOUT, "--split", "heldout", "--inception", files["weights"], "--device", "cpu"]
    a = run_json(capsys, ["eval", "stats", "digits", *common, "--out", f"{tmp_path}/"])
    b = run_json(capsys, ["eval", "stats", "embedded:digits", *common, "--out", str(tmp_path / "b.pth")])
    assert a["out"] == str(tmp_path / "digits_8_fid_stats.pth") and a["convention"] == "paper"
    assert a["n"] == b["n"] == 9
    for key in ("feature_sum", "cov_sum"):
        np.testing.assert_array_equal(getattr(load_stats(a["out"]), key), getattr(load_stats(b["out"]), key))
    assert data_config_for("embedded:photos", []).source == "photos"
    with pytest.raises(SystemExit):  # no second spelling
        main(["eval-stats", "digits", "--out", str(tmp_path / "c.pth")])
    assert "invalid choice: 'eval-stats'" in capsys.readouterr().err
