"""The run checkpointer: save then resume restores strategy, run state, loader, metric window and RNG in one call;
the strategy decides whether it can load a manifest; a different model, a changed trajectory (without the opt-in) or
``resume=never`` is refused; the config history carries on; a checkpoint at ``train.steps`` is finished."""

import json
import random

import pytest
import torch

from cluster.env import ProcessEnv
from cluster.run_contract import SUMMARY_FILE
from models import TarFlow
from trainer.checkpoint import CheckpointError, Manifest
from trainer.checkpoint.run_checkpointer import RunCheckpointer
from trainer.config import ConfigError, config_hash, load_config
from trainer.strategies import DeepSpeedZeRO, FullyShardedDataParallel, SingleDevice

TINY = ["model.channels=16", "model.head_dim=8", "model.num_blocks=2", "model.layers_per_block=1"]
CPU = torch.device("cpu")


class Component:
    """A resumable component that remembers what it was given."""

    def __init__(self, state: dict | None = None):
        self.state = state or {}

    def state_dict(self) -> dict:
        return dict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = dict(state)


def trained_strategy(cfg, seed: int) -> SingleDevice:
    torch.manual_seed(seed)
    strategy = SingleDevice(CPU)
    strategy.setup(TarFlow(cfg.model), cfg.optim)
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    z, logdets = strategy.model(x, torch.arange(4))
    strategy.backward(TarFlow.loss(z, logdets))
    strategy.step(1e-3, 1.0, torch.tensor(True))
    return strategy


def config(tmp_path, *extra):
    return load_config(None, [*TINY, f"train.run_dir={tmp_path}", "checkpoint.async_upload=false", *extra])


def test_a_fresh_run_resumes_nothing(tmp_path):
    cfg = config(tmp_path)
    loader, window = Component({"untouched": 1}), Component()
    state = RunCheckpointer(cfg, ProcessEnv(), trained_strategy(cfg, 0), CPU).resume(loader, window)
    assert state.step == 0 and state.loader == {} and loader.state == {"untouched": 1}


def test_save_then_resume_restores_every_part(tmp_path):
    cfg = config(tmp_path)
    strategy = trained_strategy(cfg, 0)
    saver = RunCheckpointer(cfg, ProcessEnv(), strategy, CPU)
    state = saver.resume(Component(), Component())
    state.step, state.images_seen, state.nonfinite_total = 7, 224, 1
    saver.save(state, Component({"epoch": 3, "position": 5}), Component({"steps": 2}))
    assert saver.finish(required=True)["step"] == 7
    after_save = (torch.rand(3).tolist(), random.random())

    resumed_strategy = trained_strategy(cfg, 1)  # other weights and optimizer state, overwritten by the resume
    loader, window = Component(), Component()
    checkpointer = RunCheckpointer(cfg, ProcessEnv(), resumed_strategy, CPU)
    resumed = checkpointer.resume(loader, window)
    assert (torch.rand(3).tolist(), random.random()) == after_save  # the RNG streams continue where they were saved
    assert (resumed.step, resumed.images_seen, resumed.nonfinite_total) == (7, 224, 1)
    assert loader.state == {"epoch": 3, "position": 5} and window.state == {"steps": 2}
    assert checkpointer.last_saved_step == 7 and checkpointer.last_uri.endswith("step-00000007")
    for key, value in strategy.unwrapped.state_dict().items():
        torch.testing.assert_close(resumed_strategy.unwrapped.state_dict()[key], value, rtol=0, atol=0)
    saved_moments = [s["exp_avg"] for s in strategy.optimizer.state.values()]
    resumed_moments = [s["exp_avg"] for s in resumed_strategy.optimizer.state.values()]
    for a, b in zip(saved_moments, resumed_moments, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    cfg = config(tmp_path)
    saver = RunCheckpointer(cfg, ProcessEnv(), trained_strategy(cfg, 0), CPU)
    saver.save(saver.resume(Component(), Component()), Component(), Component())
    saver.finish(required=True)
    other = config(tmp_path, "model.channels=32")
    with pytest.raises(CheckpointError, match=r"different model: model.channels = 16 there, 32 here"):
        RunCheckpointer(other, ProcessEnv(), trained_strategy(other, 0), CPU).resume(Component(), Component())


def test_resume_never_refuses_to_overwrite_checkpoints(tmp_path):
    cfg = config(tmp_path)
    saver = RunCheckpointer(cfg, ProcessEnv(), trained_strategy(cfg, 0), CPU)
    saver.save(saver.resume(Component(), Component()), Component(), Component())
    saver.finish(required=True)
    with pytest.raises(ValueError, match="train.resume=never but .* already holds checkpoints"):
        RunCheckpointer(config(tmp_path, "train.resume=never"), ProcessEnv(), SingleDevice(CPU), CPU)



def test_a_named_checkpoint_that_cannot_be_restored_is_one_error_naming_the_file(tmp_path, recwarn):
    cfg = config(tmp_path)
    saver = RunCheckpointer(cfg, ProcessEnv(), trained_strategy(cfg, 0), CPU)
    saver.save(saver.resume(Component(), Component()), Component(), Component())
    saver.finish(required=True)
    named = tmp_path / "checkpoints" / "step-00000000"
    (named / "manifest.json").unlink()
    other = config(tmp_path / "other", f"train.resume={named}")
    with pytest.raises(CheckpointError, match=rf"^train.resume: cannot restore checkpoint {named}: cannot read "
                                              rf"{named}/manifest.json"):
        RunCheckpointer(other, ProcessEnv(), trained_strategy(other, 0), CPU).resume(Component(), Component())
    assert not [w for w in recwarn if "skipping checkpoint" in str(w.message)]  # the error says it all

def manifest(fmt: str, strategy: str, world_size: int) -> Manifest:
    return Manifest(step=4, strategy=strategy, checkpoint_format=fmt, world_size=world_size, config_hash="x")


def test_each_strategy_says_which_manifests_it_can_resume():
    single, fsdp = SingleDevice(CPU), FullyShardedDataParallel(CPU)
    zero = DeepSpeedZeRO(CPU, {"zero_optimization": {"stage": 2}})
    assert single.can_resume(manifest("torch", "ddp", 2), world_size=1) is None
    assert fsdp.can_resume(manifest("dcp", "fsdp", 2), world_size=4) is None  # DCP reshards
    assert zero.can_resume(manifest("deepspeed", "deepspeed", 2), world_size=2) is None
    assert single.can_resume(manifest("dcp", "fsdp", 2), 1) == (
        "was written by train.strategy=fsdp (dcp format), which train.strategy=single cannot resume; resume with "
        "train.strategy=fsdp")
    assert "resumes only on as many (this run has 4)" in zero.can_resume(manifest("deepspeed", "deepspeed", 2), 4)
    assert "train.strategy=deepspeed cannot resume" in zero.can_resume(manifest("torch", "single", 4), 4)


def short_config(tmp_path, *extra):
    return config(tmp_path, "schedule.warmup_steps=2", *extra)  # the default warmup is longer than these runs


def saved_run(tmp_path, *extra):
    """A checkpoint at step 7 (of ``train.steps`` from ``extra``) in tmp_path's run directory."""
    cfg = short_config(tmp_path, *extra)
    saver = RunCheckpointer(cfg, ProcessEnv(), trained_strategy(cfg, 0), CPU)
    state = saver.resume(Component(), Component())
    state.step = 7
    saver.save(state, Component(), Component())
    saver.finish(required=True)
    return cfg


def test_a_fresh_run_starts_its_config_history_at_step_0(tmp_path):
    cfg = short_config(tmp_path)
    state = RunCheckpointer(cfg, ProcessEnv(), trained_strategy(cfg, 0), CPU).resume(Component(), Component())
    assert [(e["from_step"], e["config_hash"], e["changes"]) for e in state.config_history] == [
        (0, config_hash(cfg), {})]


def test_a_changed_trajectory_is_refused_before_anything_is_restored_and_the_download_is_removed(tmp_path):
    saved_run(tmp_path, "train.steps=20")
    before = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    changed = short_config(tmp_path, "train.steps=20", "optim.lr=1e-4")
    strategy = trained_strategy(changed, 1)
    weights = {k: v.clone() for k, v in strategy.unwrapped.state_dict().items()}
    checkpointer = RunCheckpointer(changed, ProcessEnv(), strategy, CPU)
    with pytest.raises(ConfigError, match=r"optim.lr = 0.002 there, 0.0001 here"):
        checkpointer.resume(Component(), Component())
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == before  # no .checkpoint-cache
    for key, value in strategy.unwrapped.state_dict().items():
        assert torch.equal(value, weights[key]), key  # the refused checkpoint was not loaded


def test_continuing_under_changed_settings_appends_to_the_saved_history(tmp_path, capsys):
    saved_run(tmp_path, "train.steps=20")
    changed = short_config(tmp_path, "train.steps=30", "optim.lr=1e-4", "train.resume_changes=allow")
    checkpointer = RunCheckpointer(changed, ProcessEnv(), trained_strategy(changed, 1), CPU)
    state = checkpointer.resume(Component(), Component())
    assert not checkpointer.finished and state.step == 7
    assert [(e["from_step"], e["opted_in"]) for e in state.config_history] == [(0, []), (7, ["optim.lr"])]
    assert state.config_history[1]["changes"]["train.steps"] == [20, 30]
    out = capsys.readouterr().out
    assert "note: continuing from step 7 under changed settings: train.steps 20 → 30" in out
    assert "by train.resume_changes=allow: optim.lr 0.002 → 0.0001" in out


def resumed(cfg):
    checkpointer = RunCheckpointer(cfg, ProcessEnv(), trained_strategy(cfg, 1), CPU)
    return checkpointer, checkpointer.resume(Component(), Component())


@pytest.mark.parametrize("summary, finished", [
    (None, False),                                 # checkpoints copied elsewhere: the end is still to be done
    ({"step": 7, "preempted": "SIGTERM"}, False),  # stopped during its last step: the end is still to be done
    ({"step": 7, "preempted": None}, True),
])
def test_a_checkpoint_at_train_steps_is_finished_once_the_run_has_ended(tmp_path, capsys, summary, finished):
    saved_run(tmp_path, "train.steps=7", "logging.every=3")
    if summary is not None:
        (tmp_path / SUMMARY_FILE).write_text(json.dumps(summary))
    capsys.readouterr()
    checkpointer, state = resumed(short_config(tmp_path, "train.steps=7", "logging.every=4"))
    assert checkpointer.finished == finished and state.step == 7
    out = capsys.readouterr().out
    if finished:
        assert out.startswith("already finished: the checkpoint at step 7 in ") and len(out.splitlines()) == 1
        assert len(state.config_history) == 1  # nothing runs under this config: no new segment
    else:
        assert "resumed from step 7" in out and [e["from_step"] for e in state.config_history] == [0, 7]
    assert not (tmp_path / ".checkpoint-cache").exists()


def test_poll_reports_a_committed_save_once_with_its_bytes(tmp_path):
    cfg = config(tmp_path)
    checkpointer = RunCheckpointer(cfg, ProcessEnv(), trained_strategy(cfg, 0), CPU)
    state = checkpointer.resume(Component(), Component())
    assert checkpointer.poll() is None  # nothing saved yet
    state.step = 3
    checkpointer.save(state, Component(), Component())
    record = checkpointer.poll()
    directory = tmp_path / "checkpoints" / "step-00000003"
    on_disk = sum(p.stat().st_size for p in directory.iterdir() if p.name != "manifest.json")
    assert record["step"] == 3 and record["metrics"]["checkpoint/bytes"] == on_disk
    assert checkpointer.poll() is None and checkpointer.finish(required=True) is None  # reported once


def test_poll_leaves_a_failed_save_to_finish_which_fails_the_last_one(tmp_path, monkeypatch):
    cfg = config(tmp_path)
    checkpointer = RunCheckpointer(cfg, ProcessEnv(), trained_strategy(cfg, 0), CPU)
    state = checkpointer.resume(Component(), Component())

    def refuse(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpointer.manager.store, "put_file", refuse)
    state.step = 3
    checkpointer.save(state, Component(), Component())
    assert checkpointer.poll() is None
    with pytest.raises(CheckpointError, match="disk full"):
        checkpointer.finish(required=True)
