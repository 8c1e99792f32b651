"""The `tarflow` command on a trained checkpoint: sample, eval, and conversion to and from the official code."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models import TarFlow
from tarflow.main import main
from tarflow_testing.checkpoint_helpers import model_state
from trainer.config import from_yaml_text

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cli_run")
    args = ["train", f"train.run_dir={run_dir}", "train.steps=12", "schedule.warmup_steps=2",
            "model.channels=32", "model.head_dim=16", "model.num_blocks=2", "model.layers_per_block=1",
            "train.global_batch=32", "train.micro_batch=32", "sample.num=4", "logging.every=4",
            "logging.progress=false", "sample.method=jacobi", "sample.tol=1e-3"]
    assert main(args) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    return summary


def test_sample_writes_grids_and_arrays(checkpoint, tmp_path):
    out = tmp_path / "samples"
    code = main(["sample", checkpoint["checkpoint"], "--num", "6", "--guidance", "1.5", "--annealed",
                 "--denoise", "--labels", "3", "7", "--out", str(out), "--device", "cpu"])
    assert code == 0
    arrays = np.load(out / "raw_samples.npz")
    assert arrays["g1.5"].shape == arrays["g1.5_denoised"].shape == (6, 1, 8, 8)
    assert arrays["labels"].tolist() == [3, 7, 3, 7, 3, 7]
    grid = np.asarray(Image.open(out / "raw_g1.5.png"))
    assert grid.shape[0] > 8 and grid.dtype == np.uint8
    # The same checkpoint and seed give the same samples as the model API.
    cfg = from_yaml_text((Path(checkpoint["run_dir"]) / "config.yaml").read_text())
    model = TarFlow(cfg.model)
    model.load_state_dict(model_state(checkpoint["checkpoint"]))
    noise = torch.randn(6, 16, 4, generator=torch.Generator().manual_seed(0))
    expected = model.reverse(noise, torch.tensor([3, 7] * 3), guidance=1.5, annealed_guidance=True)
    torch.testing.assert_close(torch.from_numpy(arrays["g1.5"]), expected, rtol=0, atol=0, equal_nan=True)


def test_training_time_grids_log_the_passes_of_a_parallel_inversion(checkpoint):
    records = [json.loads(line) for line in (Path(checkpoint["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    (passes,) = [r for r in records if "sample/passes_g0" in r]
    # summed over the 2 blocks: at least one pass each, at most T-1 = 15
    assert 2 <= passes["sample/passes_g0"] <= 30 and 2 <= passes["sample/passes_g1"] <= 30


def test_sample_with_a_parallel_inversion_reports_its_passes(checkpoint, tmp_path, capsys):
    out = tmp_path / "jacobi"
    assert main(["sample", checkpoint["checkpoint"], "--num", "6", "--guidance", "1.5", "--method", "jacobi",
                 "--tol", "0", "--out", str(out), "--device", "cpu"]) == 0
    passes = capsys.readouterr().err.strip().splitlines()[-1]
    assert passes.startswith("g1.5: jacobi passes per block (last block first, T-1 = 15): ")
    assert all(1 <= int(p) <= 15 for p in passes.split(": ")[-1].split()) and len(passes.split(": ")[-1].split()) == 2
    cfg = from_yaml_text((Path(checkpoint["run_dir"]) / "config.yaml").read_text())
    model = TarFlow(cfg.model)
    model.load_state_dict(model_state(checkpoint["checkpoint"]))
    noise = torch.randn(6, 16, 4, generator=torch.Generator().manual_seed(0))
    expected = model.reverse(noise, torch.arange(6) % 10, guidance=1.5)  # tol 0: the exact inverse
    torch.testing.assert_close(torch.from_numpy(np.load(out / "raw_samples.npz")["g1.5"]), expected, rtol=0, atol=1e-5)
    with pytest.raises(SystemExit):
        main(["sample", checkpoint["checkpoint"], "--method", "newton", "--out", str(out)])


def test_eval_reproduces_the_runs_final_bits_per_dim(checkpoint, capsys):
    assert main(["eval", checkpoint["checkpoint"], "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["bits_per_dim"] == pytest.approx(checkpoint["final_bits_per_dim"], rel=1e-12)
    assert report["images"] == 180


def test_eval_with_a_data_override(checkpoint, capsys):
    assert main(["eval", checkpoint["checkpoint"], "data.heldout_fraction=0.2", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["images"] == 359


def test_eval_rejects_non_data_overrides(checkpoint, capsys):
    assert main(["eval", checkpoint["checkpoint"], "model.channels=64"]) == 2
    assert "data.* overrides only" in capsys.readouterr().err


def test_import_and_export_reference_checkpoints(golden, tmp_path):
    ref = tmp_path / "ref.pth"
    torch.save(golden["state_dict"], ref)
    cfg_file = tmp_path / "golden.yaml"
    cfg_file.write_text("model:\n" + "".join(f"  {k}: {v}\n" for k, v in golden["config"].items())
                        + "  head_dim: 64\n")
    ours = tmp_path / "imported.pt"
    assert main(["ckpt", "import-reference", str(ref), "--config", str(cfg_file), "--out", str(ours)]) == 0
    back = tmp_path / "exported.pth"
    assert main(["ckpt", "export-reference", str(ours), "--out", str(back)]) == 0
    exported = torch.load(back, weights_only=True)
    assert list(exported) == list(golden["state_dict"])
    assert all(torch.equal(exported[k], v) for k, v in golden["state_dict"].items())


def test_import_with_a_mismatching_config_names_the_key(golden, tmp_path, capsys):
    ref = tmp_path / "ref.pth"
    torch.save(golden["state_dict"], ref)
    code = main(["ckpt", "import-reference", str(ref), "--out", str(tmp_path / "x.pt")])  # digits default config
    assert (code, capsys.readouterr().err) == (2, (
        f"tarflow ckpt: error: model.head_dim=32 contradicts {ref}: the official Model that wrote it computes with "
        f"head_dim=64 (fixed, not saved); set model.head_dim=64\n"))
    code = main(["ckpt", "import-reference", str(ref), "model.head_dim=64", "--out", str(tmp_path / "x.pt")])
    assert (code, capsys.readouterr().err) == (2, (
        f"tarflow ckpt: error: model.channels = 128 contradicts {ref}, whose blocks.0.proj_in.weight of shape "
        f"(64, 48) implies 64; set model.channels=64\n"))
    assert not (tmp_path / "x.pt").exists()


def test_import_of_a_file_weights_only_loading_refuses_is_one_line(golden, tmp_path, capsys):
    ref = tmp_path / "ref.pth"
    torch.save({**golden["state_dict"], "optimizer": {"lr": 1e-3, "betas": (0.9, 0.95)}, "args": Path("x")}, ref)
    code = main(["ckpt", "import-reference", str(ref), "--out", str(tmp_path / "x.pt")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"tarflow ckpt: error: {ref}: torch.load(weights_only=True) refuses its pickle (")
    assert not (tmp_path / "x.pt").exists()


def test_truncated_checkpoint_is_a_clear_error(checkpoint, tmp_path, capsys):
    import shutil
    broken = tmp_path / "ck" / "step-00000012"
    shutil.copytree(checkpoint["checkpoint"], broken)
    data = (broken / "model_optimizer.pt").read_bytes()
    (broken / "model_optimizer.pt").write_bytes(data[:5000])
    assert main(["eval", str(broken)]) == 2
    assert (f"cannot restore checkpoint {broken}: size mismatch for {broken}/model_optimizer.pt: expected "
            in capsys.readouterr().err)
    assert main(["ckpt", "verify", str(tmp_path / "ck")]) == 1
    out = capsys.readouterr().out
    assert "step 12: FAILED" in out and "model_optimizer.pt has 5000 bytes, the manifest says" in out
    one_file = tmp_path / "broken.pt"
    one_file.write_bytes(data[:5000])
    assert main(["eval", str(one_file)]) == 2
    assert "is unreadable" in capsys.readouterr().err


def test_ckpt_ls_verify_and_export(checkpoint, tmp_path, capsys):
    root = str(Path(checkpoint["checkpoint"]).parent)
    assert main(["ckpt", "ls", root]) == 0
    out = capsys.readouterr().out
    assert "step        12  complete    single      1 ranks" in out
    assert main(["ckpt", "verify", root]) == 0
    assert "step 12: ok" in capsys.readouterr().out
    assert main(["ckpt", "export", root, "--out", str(tmp_path / "model.pt")]) == 0
    exported = torch.load(tmp_path / "model.pt", weights_only=True)
    expected = model_state(checkpoint["checkpoint"])
    assert exported["step"] == 12 and all(torch.equal(exported["model"][k], v) for k, v in expected.items())
    # The export evaluates like the checkpoint and converts to the reference's format.
    assert main(["eval", str(tmp_path / "model.pt"), "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["bits_per_dim"] == pytest.approx(checkpoint["final_bits_per_dim"], rel=1e-12)
    # head_dim=16 changes no parameter shape: the official code would load the file and compute another model.
    assert main(["ckpt", "export-reference", str(tmp_path / "model.pt"), "--out", str(tmp_path / "ref.pth")]) == 2
    assert capsys.readouterr().err == (
        "tarflow ckpt: error: model.head_dim=16 cannot be exported: the official Model fixes head_dim=64 without "
        "saving it, so it would load this file with strict=True and compute a different model; export a model "
        "trained with model.head_dim=64\n")
    assert not (tmp_path / "ref.pth").exists()


def test_ckpt_export_safetensors_is_the_checkpoints_model(checkpoint, tmp_path, capsys):
    from models import read_pretrained_metadata
    from trainer.checkpoint.export import listing
    from trainer.evaluation.loading import load_model

    out = tmp_path / "hf"
    assert main(["ckpt", "export", checkpoint["checkpoint"], "--format", "safetensors", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    expected, cfg, _ = load_model(checkpoint["checkpoint"], torch.device("cpu"))
    model = TarFlow.from_pretrained(out)
    assert model.config == cfg.model and not model.training
    assert list(model.state_dict()) == list(expected.state_dict())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.state_dict().items())
    manifest_hash = listing(str(Path(checkpoint["checkpoint"]).parent))[-1]["config_hash"]
    assert read_pretrained_metadata(out) == {"weights": "raw", "step": 12, "config_hash": manifest_hash}
    # Every command taking a checkpoint reads the directory: its config is the default with this architecture.
    loaded, loaded_cfg, _ = load_model(str(out), torch.device("cpu"))
    assert loaded_cfg.model == cfg.model and loaded_cfg.data == cfg.data
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expected.state_dict().items())
    assert main(["eval", str(out), "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["bits_per_dim"] == pytest.approx(checkpoint["final_bits_per_dim"], rel=1e-12)


def test_a_broken_safetensors_export_is_one_line(checkpoint, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main(["ckpt", "export", checkpoint["checkpoint"], "--format", "safetensors", "--out", str(out)]) == 0
    capsys.readouterr()
    (out / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes()[:-64])
    assert main(["eval", str(out), "--device", "cpu"]) == 2
    assert capsys.readouterr().err.startswith(f"tarflow eval: error: {out}/model.safetensors: its sha256 is not "
                                              f"the weights_sha256 config.json records")
    (tmp_path / "model.pt").write_bytes(b"")
    assert main(["ckpt", "export", checkpoint["checkpoint"], "--format", "safetensors",
                 "--out", str(tmp_path / "model.pt")]) == 2
    assert "model.pt is a file; save_pretrained writes a directory" in capsys.readouterr().err


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "tarflow", "--help"], capture_output=True, text=True, check=True)
    assert "train" in out.stdout and "sample" in out.stdout


# ---------------------------------------------------------------- the official bits/dim of an exported model

PHOTOS_TINY = ["model.channels=64", "model.head_dim=64", "model.num_blocks=2", "model.layers_per_block=1",
               "model.patch_size=8", "train.steps=3", "schedule.warmup_steps=1", "train.global_batch=8",
               "train.micro_batch=8", "train.noise=uniform", "eval.at_start=false", "sample.num=2",
               "logging.progress=false"]


def official_evaluate_bpd(z: torch.Tensor, logdets: torch.Tensor, image_size: int) -> torch.Tensor:
    """evaluate_bpd.py's arithmetic per image (TARFLOW.md §10), written out as the official code does it: the prior
    summed over the latent, the 1/128 bin of 8-bit data in [-1, 1], n_dims = S·S·3 (it hard-codes 3 channels), the
    model's per-dimension logdets, and no prior variance."""
    T, D = z.shape[1:]
    log_p = (-0.5 * (z ** 2 + math.log(2 * math.pi))).sum(dim=(1, 2)) - math.log(128) * (T * D)
    n_dims = image_size * image_size * 3
    nll = -log_p / n_dims - logdets
    return nll / math.log(2)


def test_an_exported_model_has_the_official_bits_per_dim_of_tarflow_eval(tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    assert main(["train", str(REPO / "configs/photos.yaml"), f"train.run_dir={run_dir}", *PHOTOS_TINY]) == 0
    ckpt = json.loads((run_dir / "summary.json").read_text())["checkpoint"]
    ref = tmp_path / "model.pth"
    assert main(["ckpt", "export-reference", ckpt, "--out", str(ref)]) == 0
    capsys.readouterr()

    seen: list[torch.Tensor] = []  # the dequantised images `tarflow eval` feeds the model
    forward = TarFlow.forward

    def recording(self, x, *args, **kwargs):
        seen.append(x.detach().clone())
        return forward(self, x, *args, **kwargs)

    monkeypatch.setattr(TarFlow, "forward", recording)
    assert main(["eval", ckpt, "--device", "cpu", "--max-images", "24"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    monkeypatch.undo()
    x = torch.cat(seen)
    assert report["images"] == x.shape[0] == 24
    assert ((x + 1) * 128 % 1 != 0).float().mean() > 0.99  # dequantised: off the 8-bit grid, inside its bins

    cfg = from_yaml_text((run_dir / "config.yaml").read_text())
    official = TarFlow.from_reference(ref, cfg.model).eval()  # only what the .pth holds, in the official layout
    with torch.no_grad():
        z, logdets = official(x)
    bpd = official_evaluate_bpd(z.double(), logdets.double(), cfg.model.img_size).mean().item()
    assert 0 < bpd < 12
    assert report["bits_per_dim"] == pytest.approx(bpd, rel=1e-6)


def test_the_weights_flag_picks_the_average_or_the_trained_weights_and_every_output_says_which(
        checkpoint, tmp_path, capsys):
    run_dir = tmp_path / "ema_run"
    args = ["train", f"train.run_dir={run_dir}", "train.steps=8", "schedule.warmup_steps=2", "model.channels=32",
            "model.head_dim=16", "model.num_blocks=2", "model.layers_per_block=1", "train.global_batch=32",
            "train.micro_batch=32", "sample.num=4", "logging.every=4", "logging.progress=false",
            "train.ema.decay=0.5", "eval.at_start=false"]
    assert main(args) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["weights"] == "ema" and Path(summary["sample_grids"][0]).name.startswith("final_ema_")
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (final,) = [r for r in records if "eval/bits_per_dim_ema" in r]
    root = str(run_dir / "checkpoints")
    capsys.readouterr()
    assert main(["ckpt", "ls", root]) == 0 and capsys.readouterr().out.rstrip().endswith("+ema")
    # tarflow eval: the average by default (the run's own final figure), the trained weights on request
    for flag, weights, key in (([], "ema", "eval/bits_per_dim_ema"), (["--weights", "raw"], "raw",
                                                                     "eval/bits_per_dim")):
        assert main(["eval", root, "--device", "cpu", *flag]) == 0
        report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert report["weights"] == weights and report["bits_per_dim"] == pytest.approx(final[key], rel=1e-9)
    assert final["eval/bits_per_dim_ema"] != final["eval/bits_per_dim"]
    # exports hold one of the two and say which; the average is not the trained weights
    ema, raw = model_state(root, "ema"), model_state(root, "raw")
    assert main(["ckpt", "export", root, "--out", str(tmp_path / "ema.pt")]) == 0
    assert main(["ckpt", "export", root, "--weights", "raw", "--format", "safetensors", "--out",
                 str(tmp_path / "raw")]) == 0
    capsys.readouterr()
    exported = torch.load(tmp_path / "ema.pt", weights_only=True)
    assert exported["weights"] == "ema" and all(torch.equal(exported["model"][k], v) for k, v in ema.items())
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)
    assert json.loads((tmp_path / "raw" / "config.json").read_text())["tarflow"]["weights"] == "raw"
    assert all(torch.equal(TarFlow.from_pretrained(tmp_path / "raw").state_dict()[k], v) for k, v in raw.items())
    assert main(["sample", str(tmp_path / "ema.pt"), "--num", "2", "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "ema_g0.png").is_file()
    capsys.readouterr()
    # asking for weights a file or a checkpoint does not hold: one line naming it and the way out
    assert main(["eval", str(tmp_path / "ema.pt"), "--weights", "raw", "--device", "cpu"]) == 2
    assert "holds the weight average (ema) only, not the trained weights (raw)" in capsys.readouterr().err
    assert main(["ckpt", "export", checkpoint["checkpoint"], "--weights", "ema", "--out", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err
    assert "holds no weight average (its run had train.ema.decay=0)" in err and "--weights raw" in err
    assert not (tmp_path / "x.pt").exists()
