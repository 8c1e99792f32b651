"""``tarflow eval --metric fid`` and ``tarflow eval stats``: one process and two ranks, and their errors.

A tiny Inception-architecture network with random weights (``--inception tiny-random``) stands in for the FID
Inception: these tests check the plumbing, not FID values (real numbers need the real weights)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tarflow.main import main
from tarflow_testing.evaluation import CPU, checkpoint_and_reference, export, perturbed_model
from trainer.evaluation.fid import FeatureStats, load_stats, save_stats
from trainer.evaluation.reference import data_config_for

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return checkpoint_and_reference(tmp_path_factory.mktemp("fid"))


# ---------------------------------------------------------------- the command
def run_json(capsys, args) -> dict:
    assert main(args) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def stats_args(out) -> list[str]:
    return ["eval", "stats", "digits", "--split", "heldout", "--inception", "tiny-random:3", "--batch-size", "32",
            "--device", "cpu", "--out", str(out)]


def fid_args(files, out) -> list[str]:
    return ["eval", files["ckpt"], "--metric", "fid", "--num-samples", "12", "--guidance", "0", "1.5",
            "--inception", "tiny-random", "--ref-stats", files["ref"], "--batch-size", "4", "--seed", "9",
            "--device", "cpu", "--out", str(out)]


def two_rank_worker(argv: list[str]) -> None:
    """Run by torchrun (``-m tests.test_tarflow_evaluate``): both commands in one launch, in one process group (each
    command uses an existing group), to pay for the processes' start-up once."""
    from cluster.env import discover
    from trainer.distributed import process_group

    root = Path(argv[0])
    files = json.loads((root / "files.json").read_text())
    with process_group(discover(), CPU):
        assert main(stats_args(root / "two_stats.npz")) == 0
        assert main(fid_args(files, root / "two_fid")) == 0


@pytest.fixture(scope="module")
def two_ranks(files):
    """torchrun, 2 ranks (gloo on loopback): `eval stats` and an `eval --metric fid` sweep."""
    from tarflow_testing.runs import free_port

    root = files["root"] / "two_ranks"
    root.mkdir()
    (root / "files.json").write_text(json.dumps({k: str(v) for k, v in files.items()}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-backend=c10d", "-m", "tests.test_tarflow_evaluate",
           str(root)]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return root


def test_two_ranks_accumulate_the_same_statistics_as_one_process(two_ranks, tmp_path):
    """Each rank reads half of the held-out digits and all-reduces the float64 sums: one process's statistics."""
    assert main(stats_args(tmp_path / "one.npz")) == 0
    two, one = load_stats(two_ranks / "two_stats.npz"), load_stats(tmp_path / "one.npz")
    assert two.n == one.n == 180
    assert two.meta["ranks"] == 2 and one.meta["ranks"] == 1
    assert two.meta["network"] == one.meta["network"] and two.meta["image_shape"] == [1, 8, 8]
    # the same images, in other batches and another summation order: equal up to float rounding
    np.testing.assert_allclose(two.mu, one.mu, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(two.sigma, one.sigma, rtol=1e-5, atol=1e-10)
    assert abs(two.fid(one)) < 1e-8 * max(1.0, np.trace(one.sigma))
    assert one.meta["dataset"] == {"format": "embedded", "source": "digits", "heldout_fraction": 0.1,
                                   "split_seed": 0, "resize": 0, "crop": 0}
    assert "repeated to 3 channels" in one.meta["preprocessing"] and "bilinear" in one.meta["preprocessing"]


def test_fid_sweep_on_two_ranks_equals_one_process(files, two_ranks, tmp_path, capsys):
    """Each rank samples half of the 12 samples per setting: the same draws and FIDs as one process."""
    one = run_json(capsys, fid_args(files, tmp_path / "one"))
    two = json.loads((two_ranks / "two_fid" / "results.json").read_text())
    assert (one["ranks"], two["ranks"]) == (1, 2)
    for a, b in zip(one["results"], two["results"]):
        assert a["num_samples"] == b["num_samples"] == 12 and a["nan_redraws"] == b["nan_redraws"]
        assert b["fid"] == pytest.approx(a["fid"], rel=1e-4)
        assert b["sample_bits_per_dim"] == pytest.approx(a["sample_bits_per_dim"], rel=1e-3)
        assert b["heldout_bits_per_dim"] == pytest.approx(a["heldout_bits_per_dim"], rel=1e-3)
    for name in ("g0_t1", "g1.5_t1"):
        d1 = np.load(tmp_path / "one" / f"draws_{name}.npz")
        d2 = np.load(two_ranks / "two_fid" / f"draws_{name}.npz")
        for key in ("index", "attempt", "seed"):
            np.testing.assert_array_equal(d1[key], d2[key])
        assert set(d2["index"].tolist()) == set(range(12))  # exactly the 12 samples, none twice
        assert len(set(d2["seed"].tolist())) == len(d2["seed"])  # no noise seed used twice on any rank
        assert (two_ranks / "two_fid" / f"preview_{name}.png").is_file()
    assert len((two_ranks / "two_fid" / "sweep.csv").read_text().splitlines()) == 3
    assert (two_ranks / "two_fid" / "sweep.png").is_file()


def test_single_setting_prints_the_fid_and_saves_samples(files, tmp_path, capsys):
    report = run_json(capsys, ["eval", files["ckpt"], "--metric", "fid", "--num-samples", "6", "--guidance", "1",
                               "--annealed", "--denoise", "--inception", "tiny-random", "--ref-stats", files["ref"],
                               "--no-bpd", "--save-samples", "--out", str(tmp_path), "--device", "cpu"])
    assert report["fid"] == report["results"][0]["fid"] > 0 and report["results"][0]["sample_bits_per_dim"] is None
    saved = np.load(tmp_path / "samples_g1_t1_rank00000.npz")
    assert saved["images"].shape == (6, 1, 8, 8) and saved["images"].dtype == np.uint8
    assert saved["indices"].tolist() == list(range(6)) and saved["labels"].tolist() == list(range(6))


def test_bad_inputs_are_clear_errors(files, tmp_path, capsys, monkeypatch):
    fid = ["eval", files["ckpt"], "--metric", "fid", "--num-samples", "4", "--inception", "tiny-random",
           "--device", "cpu"]

    def error(args) -> str:
        assert main(args) == 2
        return capsys.readouterr().err

    assert "needs --ref-stats FILE" in error(fid)
    assert "FID Inception weights not found" in error(
        [*fid[:-4], "--inception", str(tmp_path / "missing.pth"), "--ref-stats", files["ref"]])
    assert "computed with the network 'tiny-random:0" in error(
        [*fid[:-4], "--inception", "tiny-random:1", "--ref-stats", files["ref"], "--device", "cpu"])
    ref = load_stats(files["ref"])
    save_stats(FeatureStats(ref.mu, ref.sigma, ref.n, {**ref.meta, "image_shape": [3, 32, 32]}), tmp_path / "rgb.npz")
    assert "describe images of shape (3, 32, 32) but the checkpoint generates (1, 8, 8)" in error(
        [*fid, "--ref-stats", str(tmp_path / "rgb.npz")])
    # a checkpoint whose weights do not match its config
    other, _ = perturbed_model(["model.channels=64"])
    _, cfg = perturbed_model()
    export(other, cfg, tmp_path / "mismatch.pt")
    assert "has shape (16, 64) but the model expects (16, 32)" in error(
        ["eval", str(tmp_path / "mismatch.pt"), "--metric", "fid", "--num-samples", "4", "--inception",
         "tiny-random", "--ref-stats", files["ref"], "--device", "cpu"])
    assert "a sweep (several --guidance / --attn-temp values)" in error(
        [*fid, "--ref-stats", files["ref"], "--guidance", "0", "1"])
    assert "--guidance applies to --metric fid only" in error(["eval", files["ckpt"], "--guidance", "1"])
    assert "neither an embedded set" in error(["eval", "stats", str(tmp_path / "nodata"), "--out",
                                               str(tmp_path / "s.npz"), "--inception", "tiny-random"])
    # N not divisible by the ranks: refused before any process group or sampling
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert "--num-samples 4 is not divisible by the 3 ranks" in error([*fid, "--ref-stats", files["ref"]])


def test_eval_stats_has_one_spelling(files, tmp_path, capsys):
    """`eval stats DATA_URI`; an embedded set by its name or as embedded:NAME, the same statistics."""
    a = run_json(capsys, ["eval", "stats", "digits", "data.heldout_fraction=0.2", "--split", "heldout",
                          "--inception", "tiny-random", "--out", str(tmp_path / "a.npz"), "--device", "cpu"])
    b = run_json(capsys, ["eval", "stats", "embedded:digits", "data.heldout_fraction=0.2", "--split", "heldout",
                          "--inception", "tiny-random", "--out", str(tmp_path / "b.npz"), "--device", "cpu"])
    assert a["n"] == b["n"] == 359
    np.testing.assert_array_equal(load_stats(tmp_path / "a.npz").mu, load_stats(tmp_path / "b.npz").mu)
    np.testing.assert_array_equal(load_stats(tmp_path / "a.npz").sigma, load_stats(tmp_path / "b.npz").sigma)
    assert data_config_for("embedded:photos", []).source == "photos"
    with pytest.raises(SystemExit):  # no second spelling
        main(["eval-stats", "digits", "--out", str(tmp_path / "c.npz")])
    assert "invalid choice: 'eval-stats'" in capsys.readouterr().err


if __name__ == "__main__":
    two_rank_worker(sys.argv[1:])
