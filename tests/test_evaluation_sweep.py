"""FID sweeps over guidance weights and attention temperatures: the settings, their notes, the table and the plot."""

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from tarflow_testing.evaluation import CPU, FP32, checkpoint_and_reference, perturbed_model
from trainer.evaluation.fid import load_stats
from trainer.evaluation.inception import load_fid_network
from trainer.evaluation.sampler import inversion_settings
from trainer.evaluation.sweep import run_sweep, settings_notes, sweep_settings


@pytest.fixture(scope="module")
def files(tmp_path_factory, fid_weights):
    return checkpoint_and_reference(tmp_path_factory.mktemp("fid"), fid_weights)


# ---------------------------------------------------------------- sweeps
def test_settings_and_their_notes():
    s = sweep_settings([0, 2, 2], [1, 0.5], annealed=True, denoise_stds=[None])
    assert [(x.guidance, x.attn_temp) for x in s] == [(0, 1), (0, 0.5), (2, 1), (2, 0.5)]
    notes = settings_notes(s, conditional=False)
    assert any("g0_t0.5: the attention temperature only acts" in n for n in notes)
    assert any("g2_t1: for an unconditional model" in n for n in notes)
    assert not any("unconditional" in n for n in settings_notes(s, conditional=True))
    with pytest.raises(ValueError, match="--attn-temp values must be finite and > 0"):
        sweep_settings([1], [0], annealed=False, denoise_stds=[None])
    with pytest.raises(ValueError, match="--guidance values must be finite and >= 0"):
        sweep_settings([-1], [1], annealed=False, denoise_stds=[None])


def test_a_guidance_sweep_writes_a_table_and_a_plot(files, tmp_path):
    model, _ = perturbed_model()
    reference = load_stats(files["ref"])
    settings = sweep_settings([0, 2], [1], annealed=True, denoise_stds=[0.05])
    results = run_sweep(model, load_fid_network(files["weights"]), reference, settings, out_dir=tmp_path, title="tiny",
                        num_samples=16, base_seed=0, batch_size=8, device=CPU, precision=FP32, heldout_bpd=8.5)
    assert results[0].fid == pytest.approx(results[0].stats.fid(reference))  # (a 2048-d FID: ~20 s of CPU each)
    assert results[0].fid != results[1].fid and all(r.fid > 0 for r in results)
    assert results[0].sample_bits_per_dim != results[1].sample_bits_per_dim
    with open(tmp_path / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(float(r["guidance"]), float(r["attn_temp"])) for r in rows] == [(0, 1), (2, 1)]
    assert set(rows[0]) == {"guidance", "attn_temp", "annealed", "denoise", "num_samples", "fid", "nan_redraws",
                            "sample_bits_per_dim", "heldout_bits_per_dim", "seconds", "class_accuracy",
                            "classifier_fd", "precision", "recall", "method", "tol", "passes_per_block"}
    assert rows[0]["classifier_fd"] == ""  # the classifier metrics: empty unless asked for
    assert rows[1]["denoise"] == "True" and float(rows[1]["heldout_bits_per_dim"]) == 8.5
    assert np.asarray(Image.open(tmp_path / "sweep.png")).shape[:2] == (400, 1000)
    preview = np.asarray(Image.open(tmp_path / "preview_g2_t1_denoised.png"))
    assert preview.shape == ((4 * 9 + 1) * 8, (4 * 9 + 1) * 8, 3)  # 16 samples, 4×4, 8×8 digits scaled 8×
    stats = load_stats(tmp_path / "samples_g2_t1_denoised_stats.pth")  # the paper convention's format
    assert stats.n == 16 and stats.meta["guidance"] == 2 and stats.meta["annealed"] is True
    draws = np.load(tmp_path / "draws_g0_t1_denoised.npz")
    assert draws["index"].tolist() == list(range(16)) and draws["seed"].dtype == np.uint64


def test_an_attention_temperature_sweep_of_an_unconditional_model(tmp_path):
    model, _ = perturbed_model(["model.num_classes=0"])
    settings = sweep_settings([1.0], [0.5, 1.5], annealed=False, denoise_stds=[None])
    results = run_sweep(model, load_fid_network("tiny-random", "pytorch-fid"), None, settings, out_dir=tmp_path,
                        num_samples=8, base_seed=0, batch_size=8, device=CPU, precision=FP32, sample_bpd=False)
    assert [r.attn_temp for r in results] == [0.5, 1.5] and all(r.fid is None for r in results)
    assert not torch.equal(results[0].preview, results[1].preview)  # the temperature changes the samples
    assert (tmp_path / "sweep.png").is_file() and len((tmp_path / "sweep.csv").read_text().splitlines()) == 3


def test_denoising_both_ways_evaluates_the_same_draws_with_and_without_the_step(tmp_path):
    model, _ = perturbed_model()
    settings = sweep_settings([1.0], [1.0], annealed=False, denoise_stds=[None, 0.05])
    assert [s.name for s in settings] == ["g1_t1", "g1_t1_denoised"]
    results = run_sweep(model, load_fid_network("tiny-random", "pytorch-fid"), None, settings, out_dir=tmp_path,
                        num_samples=8, base_seed=0, batch_size=8, device=CPU, precision=FP32, sample_bpd=False)
    raw, denoised = results
    assert (raw.denoise, denoised.denoise) == (False, True)
    assert raw.draws == denoised.draws  # the same noise per sample: a paired comparison
    assert not torch.equal(raw.preview, denoised.preview)  # the score step moves the samples
    # one Tweedie step with σ = 0.05 moves a pixel by a few quantisation levels at most
    assert (raw.preview.int() - denoised.preview.int()).abs().float().mean() < 8
    with open(tmp_path / "sweep.csv") as f:
        assert [r["denoise"] for r in csv.DictReader(f)] == ["False", "True"]
    assert (tmp_path / "preview_g1_t1.png").is_file() and (tmp_path / "preview_g1_t1_denoised.png").is_file()


def test_a_sweep_with_jacobi_inversion_names_the_method_and_reports_the_passes(tmp_path):
    """tol=0 Jacobi draws the same samples as the sequential sampler (up to kernel rounding: equal after
    quantisation here), and the rows say which inversion ran and what it cost per block."""
    model, _ = perturbed_model()
    exact = inversion_settings("jacobi", 0.0)
    sequential, jacobi = [sweep_settings([1.0], [1.0], annealed=False, denoise_stds=[None], inversion=inv)[0]
                          for inv in (None, exact)]
    assert (sequential.name, jacobi.name) == ("g1_t1", "g1_t1_jacobi0")
    results = run_sweep(model, load_fid_network("tiny-random", "pytorch-fid"), None, [sequential, jacobi],
                        out_dir=tmp_path, num_samples=8, base_seed=0, batch_size=4, device=CPU, precision=FP32,
                        sample_bpd=False)
    seq, jac = results
    assert (seq.method, seq.tol, jac.method, jac.tol) == ("sequential", None, "jacobi", 0.0)
    T = model.config.num_patches
    assert seq.passes_per_block == " ".join([str(T - 1)] * len(model.blocks))
    assert all(1 <= float(p) <= T - 1 for p in jac.passes_per_block.split())
    assert (seq.preview.int() - jac.preview.int()).abs().max() <= 1
    with open(tmp_path / "sweep.csv") as f:
        assert [(r["method"], r["passes_per_block"]) for r in csv.DictReader(f)] == [
            ("sequential", seq.passes_per_block), ("jacobi", jac.passes_per_block)]
