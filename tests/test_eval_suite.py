"""FID evaluation: the sampling plan across ranks, NaN redraws, sweeps, the commands, and their errors.

A tiny Inception-architecture network with random weights (``--inception tiny-random``) stands in for the FID
Inception: these tests check the plumbing, not FID values (real numbers need the real weights)."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models import TarFlow
from trainer.checkpoint import FORMAT_VERSION, atomic_torch_save
from trainer.cli import main
from trainer.config import config_hash, load_config, to_yaml
from trainer.eval_suite import (SamplingSettings, check_num_samples, data_config_for, draw_noise, draw_samples,
                                evaluate_setting, noise_seed, rank_indices, run_sweep, sample_labels,
                                settings_notes, sweep_settings)
from trainer.fid import FeatureStats, FIDError, load_stats, save_stats
from trainer.inception import tiny_fid_inception
from trainer.runtime import Precision

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.channels=32", "model.head_dim=16", "model.num_blocks=2", "model.layers_per_block=1"]
CPU = torch.device("cpu")
FP32 = Precision(None)


def perturbed_model(overrides=(), seed=0) -> tuple[TarFlow, object]:
    """A tiny digits TarFlow whose blocks do something (a fresh one's proj_out is zero: guidance would be a no-op)."""
    cfg = load_config(None, [*TINY, *overrides])
    torch.manual_seed(seed)
    model = TarFlow(cfg.model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.02 if "proj_out" in name else 0.3 if "embed" in name else 0.05
            p.add_(torch.randn_like(p) * scale)
    return model.eval(), cfg


def export(model: TarFlow, cfg, path: Path) -> Path:
    atomic_torch_save({"format": FORMAT_VERSION, "step": 0, "model": model.state_dict(), "config_yaml": to_yaml(cfg),
                       "config_hash": config_hash(cfg)}, path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("fid")
    model, cfg = perturbed_model()
    ckpt = export(model, cfg, root / "model.pt")
    ref = root / "ref.npz"
    assert main(["eval", "stats", "digits", "--split", "heldout", "--inception", "tiny-random", "--out", str(ref),
                 "--device", "cpu"]) == 0
    return {"root": root, "ckpt": str(ckpt), "ref": str(ref)}


# ---------------------------------------------------------------- the sampling plan
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_ranks_cover_exactly_the_requested_samples_with_distinct_seeds(world_size):
    n = 12
    slices = [rank_indices(n, r, world_size) for r in range(world_size)]
    assert sorted(i for s in slices for i in s) == list(range(n))
    assert len({len(s) for s in slices}) == 1
    seeds = [noise_seed(7, i, a) for i in range(n) for a in range(3)]
    assert len(set(seeds)) == len(seeds)  # redraws included: no two draws share a seed
    assert noise_seed(7, 3) != noise_seed(8, 3)


def test_a_count_not_divisible_by_the_ranks_is_a_clear_error():
    assert check_num_samples(12, 4) == 3
    with pytest.raises(ValueError, match="--num-samples 10 is not divisible by the 4 ranks.*e.g. 8 or 12"):
        check_num_samples(10, 4)
    with pytest.raises(ValueError, match="must be >= 1"):
        check_num_samples(0, 1)


def test_noise_and_labels_depend_only_on_the_global_index():
    model, _ = perturbed_model()
    c = model.config
    assert sample_labels(range(8, 13), 10).tolist() == [8, 9, 0, 1, 2]
    assert sample_labels(range(3), 0) is None
    s = SamplingSettings(guidance=1.5)
    one = list(draw_samples(model, range(12), s, base_seed=5, batch_size=5, device=CPU, precision=FP32))
    three = [b for r in range(3) for b in draw_samples(model, rank_indices(12, r, 3), s, base_seed=5,
                                                       batch_size=3, device=CPU, precision=FP32)]
    assert [i for b in one for i in b.indices] == [i for b in three for i in b.indices] == list(range(12))
    assert [d for b in one for d in b.draws] == [d for b in three for d in b.draws]
    torch.testing.assert_close(torch.cat([b.images for b in one]), torch.cat([b.images for b in three]),
                               rtol=1e-5, atol=1e-5)
    # sample 4 is model.reverse of its own noise and label
    expected = model.reverse(draw_noise(c, [noise_seed(5, 4)]), torch.tensor([4]), guidance=1.5)
    torch.testing.assert_close(one[0].images[4:5], expected, rtol=1e-5, atol=1e-5)


class Flaky(TarFlow):
    """NaN wherever the first noise value exceeds 0.5 (about 31% of draws)."""

    def reverse(self, noise, y=None, **kwargs):
        x = super().reverse(noise, y, **kwargs)
        bad = noise[:, 0, 0] > 0.5
        return torch.where(bad[:, None, None, None], torch.full_like(x, float("nan")), x)


def test_nan_samples_are_redrawn_with_fresh_noise_and_counted():
    model, cfg = perturbed_model()
    flaky = Flaky(cfg.model)
    flaky.load_state_dict(model.state_dict())
    c = flaky.config

    def first_good_attempt(i):
        a = 0
        while draw_noise(c, [noise_seed(3, i, a)])[0, 0, 0] > 0.5:
            a += 1
        return a

    attempts = [first_good_attempt(i) for i in range(12)]
    assert sum(attempts) > 0
    batches = list(draw_samples(flaky, range(12), SamplingSettings(), base_seed=3, batch_size=6, device=CPU,
                                precision=FP32))
    images = torch.cat([b.images for b in batches])
    assert torch.isfinite(images).all() and sum(b.redraws for b in batches) == sum(attempts)
    draws = [d for b in batches for d in b.draws]
    assert sorted((i, a) for i, a, _ in draws) == sorted((i, a) for i in range(12) for a in range(attempts[i] + 1))
    i = attempts.index(max(attempts))  # a redrawn sample is the model's sample of its last, good noise
    expected = model.reverse(draw_noise(c, [noise_seed(3, i, attempts[i])]), torch.tensor([i % 10]))
    torch.testing.assert_close(images[i:i + 1], expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(FIDError, match=r"still NaN/Inf after 0 redraws"):
        list(draw_samples(flaky, range(12), SamplingSettings(), base_seed=3, batch_size=6, device=CPU,
                          precision=FP32, max_redraws=0))
    # through the evaluation: the count is reported
    result = evaluate_setting(flaky, tiny_fid_inception(), None, SamplingSettings(), num_samples=12, base_seed=3,
                              batch_size=6, device=CPU, precision=FP32)
    assert result.nan_redraws == sum(attempts) and result.num_samples == 12 and result.fid is None


# ---------------------------------------------------------------- sweeps
def test_settings_and_their_notes():
    s = sweep_settings([0, 2, 2], [1, 0.5], annealed=True, denoise_std=None)
    assert [(x.guidance, x.attn_temp) for x in s] == [(0, 1), (0, 0.5), (2, 1), (2, 0.5)]
    notes = settings_notes(s, conditional=False)
    assert any("g0_t0.5: the attention temperature only acts" in n for n in notes)
    assert any("g2_t1: for an unconditional model" in n for n in notes)
    assert not any("unconditional" in n for n in settings_notes(s, conditional=True))
    with pytest.raises(ValueError, match="--attn-temp values must be finite and > 0"):
        sweep_settings([1], [0], annealed=False, denoise_std=None)
    with pytest.raises(ValueError, match="--guidance values must be finite and >= 0"):
        sweep_settings([-1], [1], annealed=False, denoise_std=None)


def test_a_guidance_sweep_writes_a_table_and_a_plot(files, tmp_path):
    model, _ = perturbed_model()
    reference = load_stats(files["ref"])
    settings = sweep_settings([0, 2], [1], annealed=True, denoise_std=0.05)
    results = run_sweep(model, tiny_fid_inception(), reference, settings, out_dir=tmp_path, title="tiny",
                        num_samples=16, base_seed=0, batch_size=8, device=CPU, precision=FP32, heldout_bpd=8.5)
    assert [r.fid for r in results] == [pytest.approx(r.stats.fid(reference)) for r in results]
    assert results[0].fid != results[1].fid and all(r.fid > 0 for r in results)
    assert results[0].sample_bits_per_dim != results[1].sample_bits_per_dim
    with open(tmp_path / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(float(r["guidance"]), float(r["attn_temp"])) for r in rows] == [(0, 1), (2, 1)]
    assert set(rows[0]) == {"guidance", "attn_temp", "annealed", "denoise", "num_samples", "fid", "nan_redraws",
                            "sample_bits_per_dim", "heldout_bits_per_dim", "seconds"}
    assert rows[1]["denoise"] == "True" and float(rows[1]["heldout_bits_per_dim"]) == 8.5
    assert np.asarray(Image.open(tmp_path / "sweep.png")).shape[:2] == (400, 1000)
    preview = np.asarray(Image.open(tmp_path / "preview_g2_t1.png"))
    assert preview.shape == ((4 * 9 + 1) * 8, (4 * 9 + 1) * 8, 3)  # 16 samples, 4×4, 8×8 digits scaled 8×
    stats = load_stats(tmp_path / "samples_g2_t1_stats.npz")
    assert stats.n == 16 and stats.meta["guidance"] == 2 and stats.meta["annealed"] is True
    draws = np.load(tmp_path / "draws_g0_t1.npz")
    assert draws["index"].tolist() == list(range(16)) and draws["seed"].dtype == np.uint64


def test_an_attention_temperature_sweep_of_an_unconditional_model(tmp_path):
    model, _ = perturbed_model(["model.num_classes=0"])
    settings = sweep_settings([1.0], [0.5, 1.5], annealed=False, denoise_std=None)
    results = run_sweep(model, tiny_fid_inception(), None, settings, out_dir=tmp_path, num_samples=8,
                        base_seed=0, batch_size=8, device=CPU, precision=FP32, sample_bpd=False)
    assert [r.attn_temp for r in results] == [0.5, 1.5] and all(r.fid is None for r in results)
    assert not torch.equal(results[0].preview, results[1].preview)  # the temperature changes the samples
    assert (tmp_path / "sweep.png").is_file() and len((tmp_path / "sweep.csv").read_text().splitlines()) == 3


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
    """Run by torchrun (``-m tests.test_eval_suite``): both commands in one launch, in one process group (each
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
    from tests.test_ddp import free_port

    root = files["root"] / "two_ranks"
    root.mkdir()
    (root / "files.json").write_text(json.dumps({k: str(v) for k, v in files.items()}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-backend=c10d", "-m", "tests.test_eval_suite",
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


def test_eval_stats_has_two_spellings(files, tmp_path, capsys):
    a = run_json(capsys, ["eval-stats", "digits", "data.heldout_fraction=0.2", "--split", "heldout",
                          "--inception", "tiny-random", "--out", str(tmp_path / "a.npz"), "--device", "cpu"])
    b = run_json(capsys, ["eval", "stats", "digits", "data.heldout_fraction=0.2", "--split", "heldout",
                          "--inception", "tiny-random", "--out", str(tmp_path / "b.npz"), "--device", "cpu"])
    assert a["n"] == b["n"] == 359
    np.testing.assert_array_equal(load_stats(tmp_path / "a.npz").mu, load_stats(tmp_path / "b.npz").mu)
    assert data_config_for("embedded:photos", []).source == "photos"


if __name__ == "__main__":
    two_rank_worker(sys.argv[1:])
