"""Training runs end to end on the embedded digits: learning, exact resume, NaN handling, what the console,
TensorBoard and the run directory show."""

import contextlib
import io
import json
import os
import re
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

import trainer.strategies.single as strategy_module
from models import TarFlow
from tarflow_testing.checkpoint_helpers import steps, strategy_state
from trainer.config import load_config
from trainer.flops import flops_per_image
from trainer.loop import NonFiniteLossError, train
from trainer.startup_summary import si

TINY = ["model.channels=32", "model.head_dim=16", "model.num_blocks=2", "model.layers_per_block=1",
        "train.global_batch=32", "train.micro_batch=16", "schedule.warmup_steps=5", "optim.lr=3e-3",
        "eval.every=0", "sample.every=0", "sample.num=8", "logging.every=5", "logging.progress=false"]


def tiny_config(run_dir: Path, *extra: str):
    return load_config(None, [*TINY, f"train.run_dir={run_dir}", *extra])


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """60 steps, logged every 5, checkpoints every 20, sample grids at 30 and 60, TensorBoard on, under umask 027 (a
    group-readable setting, where a file created 0600 shows); what it printed is kept in run_dir/console.txt."""
    run_dir = tmp_path_factory.mktemp("trained")
    printed = io.StringIO()
    umask = os.umask(0o027)
    try:
        with contextlib.redirect_stdout(printed):
            result = train(tiny_config(run_dir, "train.steps=60", "checkpoint.every=20", "sample.every=30",
                                       "logging.tensorboard=true"))
        (run_dir / "console.txt").write_text(printed.getvalue())
    finally:
        os.umask(umask)
    return result


def records_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_short_run_lowers_heldout_bits_per_dim(trained_run):
    assert trained_run.initial_bits_per_dim > 8.0  # an untrained flow is near the 8-bit uniform density
    assert trained_run.final_bits_per_dim < trained_run.initial_bits_per_dim - 1.0


def test_run_directory_holds_config_metrics_samples_and_checkpoints(trained_run):
    run_dir = trained_run.run_dir
    assert load_config(run_dir / "config.yaml").train.steps == 60
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if "train/loss" in r]
    assert train_steps == list(range(5, 61, 5))
    evals = [r for r in records if "eval/bits_per_dim" in r]
    assert [r["step"] for r in evals] == [0, 60]
    assert evals[0]["eval/bits_per_dim"] == pytest.approx(trained_run.initial_bits_per_dim)
    assert evals[-1]["eval/bits_per_dim"] == pytest.approx(trained_run.final_bits_per_dim)
    assert {"train/bits_per_dim", "train/prior", "train/logdet", "train/lr", "train/grad_norm",
            "train/images_per_second", "train/tokens_per_second"} <= set([r for r in records if "train/loss" in r][-1])
    saves = [r for r in records if "checkpoint/save_seconds" in r]
    assert [r["step"] for r in saves] == [20, 40, 60]
    assert all(0 < r["checkpoint/blocked_seconds"] <= r["checkpoint/save_seconds"] for r in saves)
    assert records[0]["model/parameters"] > 0 and records[0]["model/train_flops_per_image"] > 0
    names = {p.name for p in (run_dir / "samples").iterdir()}
    assert {"final_raw_g0.png", "final_raw_g1.png", "final_raw_g0_denoised.png", "final_raw_g1_denoised.png",
            "final_raw_samples.npz"} <= names
    assert steps(run_dir / "checkpoints") == [40, 60]  # keep=2 of 20, 40, 60
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_bits_per_dim"] == trained_run.final_bits_per_dim


def test_console_has_one_metric_line_per_interval_and_checkpoints_on_lines_of_their_own(trained_run):
    lines = (trained_run.run_dir / "console.txt").read_text().splitlines()
    progress = [line for line in lines if line.startswith("step ")]
    assert [int(re.match(r"step (\d+)/60 ", line).group(1)) for line in progress] == list(range(5, 61, 5))
    assert all(" loss " in line and " bpd " in line for line in progress)  # no bare `step N/M` line
    # Each save is one labelled line under its own step, printed after that step's progress line (once its upload
    # is done), with the bytes that are on disk.
    for step in (20, 40, 60):
        (line,) = [line for line in lines if line.startswith(f"checkpoint step {step}/60 committed: ")]
        assert lines.index(line) > lines.index(progress[step // 5 - 1])
    saves = {r["step"]: r for r in records_of(trained_run.run_dir) if "checkpoint/bytes" in r}
    assert sorted(saves) == [20, 40, 60]
    for step in (40, 60):  # kept by retention
        directory = trained_run.run_dir / "checkpoints" / f"step-{step:08d}"
        on_disk = sum(p.stat().st_size for p in directory.iterdir() if p.name != "manifest.json")
        assert saves[step]["checkpoint/bytes"] == on_disk
    assert [line for line in lines if line.startswith("eval step ")] == [
        line for line in lines if re.match(r"eval step (0|60)/60: held-out bpd \d+\.\d{4} over 180 images$", line)]


def test_startup_summary_is_printed_once_with_what_the_run_is(trained_run):
    text = (trained_run.run_dir / "console.txt").read_text()
    cfg = load_config(trained_run.run_dir / "config.yaml")
    parameters = sum(p.numel() for p in TarFlow(cfg.model).parameters())
    assert text.count("\nmodel ") + text.startswith("model ") == 1
    assert f"model        {parameters:,} parameters" in text
    assert f"{si(flops_per_image(cfg.model).train, 'FLOP')} per image per training step" in text
    assert f"run          {trained_run.run_dir}: fresh start (step 0), to step 60" in text
    assert "launch       cpu, 1 rank on 1 node, strategy single, precision fp32" in text
    assert "batch        32 images per step = 16 per forward × 2 accumulation × 1 rank" in text
    assert "data         embedded digits: 1,617 train, 180 held-out images (1×8×8, 10 classes)" in text
    assert f"metrics      console, {trained_run.run_dir / 'metrics.jsonl'}, tensorboard " in text


def test_tensorboard_holds_the_jsonl_scalars_and_the_sample_grids(trained_run):
    from PIL import Image
    from tensorboard.backend.event_processing import event_accumulator as ea

    events = ea.EventAccumulator(str(trained_run.run_dir / "tensorboard"), size_guidance={ea.SCALARS: 0,
                                                                                          ea.IMAGES: 0})
    events.Reload()
    expected: dict[str, list] = {}
    for r in records_of(trained_run.run_dir):
        for key, value in r.items():
            if key != "step":
                expected.setdefault(key, []).append((r["step"], float(np.float32(value))))
    assert set(events.Tags()["scalars"]) == set(expected)
    for key, points in expected.items():  # TensorBoard stores scalars as float32
        assert [(e.step, e.value) for e in events.Scalars(key)] == points, key
    names = ("g0", "g1", "g0_denoised", "g1_denoised")
    assert set(events.Tags()["images"]) == {f"samples/raw_{n}" for n in names}  # the weights they are of
    for name in names:
        shown = events.Images(f"samples/raw_{name}")
        assert [e.step for e in shown] == [30, 60]
        png = trained_run.run_dir / "samples" / f"step00000030_raw_{name}.png"
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(shown[0].encoded_image_string))),
                                      np.asarray(Image.open(png)))


def test_every_file_of_the_run_has_the_mode_the_umask_gives(trained_run):
    expected = 0o666 & ~0o027  # what a plain open() creates under the fixture's umask
    files = [p for p in trained_run.run_dir.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} >= {".png", ".npz", ".pt", ".json", ".jsonl", ".yaml"}
    assert {str(p.relative_to(trained_run.run_dir)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files
            if stat.S_IMODE(p.stat().st_mode) != expected} == {}


def test_train_loss_bits_per_dim_is_consistent_with_loss(trained_run):
    import math
    records = [json.loads(line) for line in (trained_run.run_dir / "metrics.jsonl").read_text().splitlines()]
    r = [r for r in records if "train/loss" in r][-1]
    expected = (r["train/loss"] + 0.5 * math.log(2 * math.pi) + math.log(128)) / math.log(2)
    assert r["train/bits_per_dim"] == pytest.approx(expected, rel=1e-12)
    assert r["train/loss"] == pytest.approx(r["train/prior"] - r["train/logdet"], rel=1e-6)


class Crash(RuntimeError):
    pass


def crash_after(monkeypatch, calls: int):
    original = strategy_module.SingleDevice.step
    count = {"n": 0}

    def step(self, *args, **kwargs):
        count["n"] += 1
        if count["n"] > calls:
            raise Crash("simulated crash")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(strategy_module.SingleDevice, "step", step)


def final_state(run_dir: Path, step: int) -> dict:
    return strategy_state(run_dir / "checkpoints" / f"step-{step:08d}")


def tensorboard_losses(run_dir: Path) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing import event_accumulator as ea

    events = ea.EventAccumulator(str(run_dir / "tensorboard"), size_guidance={ea.SCALARS: 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars("train/loss")]


def test_resume_after_a_crash_reproduces_the_uninterrupted_run_bitwise(tmp_path, monkeypatch, capsys):
    extra = ["train.steps=24", "checkpoint.every=8", "data.random_flip=true", "train.label_drop=0.3",
             "logging.tensorboard=true"]
    train(tiny_config(tmp_path / "straight", *extra))

    crash_after(monkeypatch, 13)  # dies during step 14: the last checkpoint is step 8
    with pytest.raises(Crash):
        train(tiny_config(tmp_path / "crashed", *extra))
    monkeypatch.undo()
    assert steps(tmp_path / "crashed" / "checkpoints") == [8]
    capsys.readouterr()
    result = train(tiny_config(tmp_path / "crashed", *extra))  # resume=auto
    assert result.step == 24
    checkpoint = tmp_path / "crashed" / "checkpoints" / "step-00000008"
    assert f"run          {tmp_path / 'crashed'}: resumed from step 8 ({checkpoint}), to step 24" in \
        capsys.readouterr().out
    # TensorBoard drops what the crashed attempt logged after step 8: one curve, the uninterrupted run's.
    assert tensorboard_losses(tmp_path / "crashed") == tensorboard_losses(tmp_path / "straight")

    a, b = final_state(tmp_path / "straight", 24), final_state(tmp_path / "crashed", 24)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for pid, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][pid][name]), (pid, name)
    lines = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    losses = lambda d: [(r["step"], r["train/loss"]) for r in lines(d) if "train/loss" in r]  # noqa: E731
    assert losses(tmp_path / "straight") == losses(tmp_path / "crashed")


def nan_loss_on(monkeypatch, bad_calls: set[int]):
    original = TarFlow.loss
    count = {"n": 0}

    def loss(z, logdets):
        count["n"] += 1
        value = original(z, logdets)
        return value * float("nan") if count["n"] in bad_calls else value

    monkeypatch.setattr(TarFlow, "loss", staticmethod(loss))


def test_nonfinite_steps_are_skipped_and_counted(tmp_path, monkeypatch):
    # Micro-batches 7 and 8 (both halves of step 4) and 13 (first half of step 7) are NaN.
    nan_loss_on(monkeypatch, {7, 8, 13})
    result = train(tiny_config(tmp_path, "train.steps=10", "checkpoint.every=0", "eval.at_start=false"))
    assert result.nonfinite_steps == 2
    state = strategy_state(result.checkpoint)
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    steps_taken = {int(s["step"]) for s in state["optimizer"]["state"].values()}
    assert steps_taken == {8}  # 10 steps, 2 skipped: the optimizer never saw a NaN gradient


def test_a_run_that_keeps_producing_nans_stops_without_a_poisoned_checkpoint(tmp_path, monkeypatch):
    nan_loss_on(monkeypatch, set(range(2 * 11 + 1, 1000)))  # every micro-batch from step 12 on
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps had a NaN/Inf loss"):
        train(tiny_config(tmp_path, "train.steps=40", "checkpoint.every=5", "train.max_nonfinite_steps=3",
                          "eval.at_start=false"))
    assert steps(tmp_path / "checkpoints") == [5, 10]
    state = strategy_state(tmp_path / "checkpoints")
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_resume_never_refuses_to_overwrite_checkpoints(trained_run):
    cfg = tiny_config(trained_run.run_dir, "train.steps=60", "train.resume=never")
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(cfg)


def test_model_and_data_mismatch_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="model.num_classes=7 but the data has 10 classes"):
        train(tiny_config(tmp_path, "model.num_classes=7"))
    with pytest.raises(ValueError, match=r"do not match the data's images \(1, 8, 8\)"):
        train(tiny_config(tmp_path, "model.in_channels=3"))


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    # Without label drop, two micro-batches of 16 draw the same data and noise as one batch of 32.
    common = ["train.steps=6", "eval.at_start=false", "train.label_drop=0", "logging.every=1"]
    one = train(tiny_config(tmp_path / "one", "train.micro_batch=32", *common))
    two = train(tiny_config(tmp_path / "two", "train.micro_batch=16", *common))
    lines = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    losses = lambda d: [r["train/loss"] for r in lines(d) if "train/loss" in r]  # noqa: E731
    assert losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "two"), rel=1e-5)
    assert lines(tmp_path / "two")[0]["train/accumulation_steps"] == 2
    a = strategy_state(one.checkpoint)["model"]
    b = strategy_state(two.checkpoint)["model"]
    for key in a:  # summation order differs; AdamW turns that into at most ~lr-sized differences
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-3)


def test_wandb_offline_logging_does_not_need_a_network(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(tiny_config(tmp_path, "train.steps=6", "logging.wandb=true", "eval.at_start=false"))
    assert list((tmp_path / "wandb").glob("offline-run-*"))


@pytest.fixture(scope="module")
def digit_shards(tmp_path_factory):
    from data_pipeline.sources import open_source
    from data_pipeline.writer import write_dataset

    root = tmp_path_factory.mktemp("shards")
    write_dataset(open_source("digits"), str(root / "webdataset"), "webdataset", shard_size=30_000)
    write_dataset(open_source("digits"), str(root / "mds"), "mds", shard_size=30_000)
    return root


@pytest.mark.streaming  # see tests/conftest.py
@pytest.mark.parametrize("fmt", ["webdataset", "mds"])
def test_training_on_shards_resumes_bitwise_with_loader_workers(tmp_path, monkeypatch, digit_shards, fmt):
    extra = [f"data.format={fmt}", f"data.uri={digit_shards / fmt}", "data.num_workers=2", "data.shuffle_buffer=64",
             f"data.cache_dir={tmp_path / 'cache'}", "train.steps=16", "checkpoint.every=6", "eval.at_start=false"]
    straight = train(tiny_config(tmp_path / "straight", *extra))
    crash_after(monkeypatch, 9)
    with pytest.raises(Crash):
        train(tiny_config(tmp_path / "crashed", *extra))
    monkeypatch.undo()
    resumed = train(tiny_config(tmp_path / "crashed", *extra))
    a, b = final_state(tmp_path / "straight", 16), final_state(tmp_path / "crashed", 16)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert resumed.final_bits_per_dim == straight.final_bits_per_dim
