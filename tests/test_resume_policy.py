"""Resuming under a changed config: every key is classified; a change to what the run computes (or to the model)
is refused before anything is written, with one line naming each key and both values; launch and logging changes
continue; ``train.resume_changes=allow`` continues and records the change; a finished run is not run again."""

import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from tarflow.main import main
from tarflow_testing.runs import REPO, TINY, free_port, torchrun
from trainer.checkpoint import CheckpointError
from trainer.config import Config, ConfigError, TrainConfig, load_config
from trainer.resume_policy import (
    FREE,
    MODEL,
    RESUME_KINDS,
    TRAJECTORY,
    check_resume,
    config_changes,
    config_values,
    continued_history,
    history_entry,
)

BASE = [*TINY, "eval.at_start=false", "eval.max_images=32", "train.steps=4", "checkpoint.every=0"]


# ---------------------------------------------------------------- the table
def unclassified(cfg) -> list[str]:
    return sorted(set(config_values(cfg)) - set(RESUME_KINDS))


def test_every_config_key_is_classified_and_every_classified_key_exists():
    assert unclassified(Config()) == [], "classify these keys in trainer/resume_policy.py RESUME_KINDS"
    assert sorted(set(RESUME_KINDS) - set(config_values(Config()))) == [], "RESUME_KINDS names keys that are gone"
    assert set(RESUME_KINDS.values()) == {FREE, TRAJECTORY, MODEL}


def test_a_new_key_that_nobody_classified_is_reported():
    @dataclass
    class TrainWithNewKey(TrainConfig):
        new_knob: int = 3

    @dataclass
    class ConfigWithNewKey(Config):
        train: TrainWithNewKey = field(default_factory=TrainWithNewKey)

    assert unclassified(ConfigWithNewKey()) == ["train.new_knob"]
    with pytest.raises(LookupError, match="'train.new_knob' is not classified in trainer/resume_policy.py"):
        config_changes(ConfigWithNewKey(), ConfigWithNewKey(train=TrainWithNewKey(new_knob=4)))


def test_the_keys_the_issue_names_have_the_kind_it_gives_them():
    free = ["train.steps", "train.micro_batch", "train.strategy", "train.activation_checkpointing", "train.compile",
            "train.device", "train.resume", "train.resume_changes", "data.num_workers", "checkpoint.every",
            "checkpoint.keep", "checkpoint.keep_every", "checkpoint.async_upload", "logging.every", "eval.every",
            "sample.every", "preemption.time_limit_minutes"]
    trajectory = ["optim.lr", "data.source", "data.uri", "train.seed", "train.global_batch", "train.noise",
                  "train.precision", "schedule.warmup_steps"]
    assert {k: RESUME_KINDS[k] for k in free} == dict.fromkeys(free, FREE)
    assert {k: RESUME_KINDS[k] for k in trajectory} == dict.fromkeys(trajectory, TRAJECTORY)
    assert {k for k, v in RESUME_KINDS.items() if v == MODEL} == {k for k in RESUME_KINDS if k.startswith("model.")}


# ---------------------------------------------------------------- the decision
def cfg(*overrides):
    return load_config(None, [*TINY, *overrides])


def test_launch_and_logging_changes_continue():
    changes = config_changes(cfg(), cfg("train.steps=50", "logging.every=7", "data.num_workers=2",
                                        "train.micro_batch=16"))
    assert [(c.key, c.before, c.after, c.kind) for c in changes] == [
        ("data.num_workers", 0, 2, FREE), ("train.steps", 1000, 50, FREE), ("train.micro_batch", 8, 16, FREE),
        ("logging.every", 2, 7, FREE)]
    check_resume(changes, cfg(), step=10, where="ck")  # no error


def test_a_trajectory_change_is_refused_naming_every_differing_key_and_both_ways_forward():
    new = cfg("optim.lr=1e-3", "train.seed=5", "logging.every=9")
    with pytest.raises(ConfigError) as refused:
        check_resume(config_changes(cfg(), new), new, step=20, where="runs/x/checkpoints/")
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("the checkpoint at step 20 in runs/x/checkpoints/ was written under another config: "
                              "optim.lr = 0.003 there, 0.001 here, train.seed = 0 there, 5 here, "
                              "logging.every = 2 there, 9 here; what the run computes depends on optim.lr, train.seed, "
                              "so nothing was written")
    assert "use a new train.run_dir to start a new run" in message
    assert "add train.resume_changes=allow to continue this one under the new values from step 20 on" in message


def test_the_fresh_start_hint_names_what_chooses_the_checkpoint():
    for extra, hint in ((["checkpoint.uri=s3://b/ck"], "use a new train.run_dir and checkpoint.uri"),
                        (["train.resume=/r/step-00000004"], "leave out train.resume (and use a new train.run_dir)")):
        new = cfg("optim.lr=1e-3", *extra)
        with pytest.raises(ConfigError, match=rf"Either {re.escape(hint)} to start a new run"):
            check_resume(config_changes(cfg(*extra), new), new, step=4, where="ck")


def test_the_opt_in_allows_a_trajectory_change_but_never_another_model():
    allowed = cfg("optim.lr=1e-3", "train.resume_changes=allow")
    check_resume(config_changes(cfg(), allowed), allowed, step=4, where="ck")  # no error
    other_model = cfg("model.channels=64", "optim.lr=1e-3", "train.resume_changes=allow")
    with pytest.raises(CheckpointError) as refused:
        check_resume(config_changes(cfg(), other_model), other_model, step=4, where="ck")
    assert str(refused.value).startswith(
        "the checkpoint at step 4 in ck is of a different model: model.channels = 32 there, 64 here (and optim.lr = "
        "0.003 there, 0.001 here, train.resume_changes = 'refuse' there, 'allow' here); its weights cannot load into "
        "this model, so not even train.resume_changes=allow continues it")


# ---------------------------------------------------------------- the history
def test_the_history_gains_an_entry_only_when_the_config_changed():
    old, new = cfg(), cfg("optim.lr=1e-3", "train.resume_changes=allow")
    start = [history_entry(0, old, [])]
    assert continued_history(start, old, 8, old, []) == start
    history = continued_history(start, old, 8, new, config_changes(old, new))
    assert history[0] == start[0] and len(history) == 2
    assert history[1]["from_step"] == 8 and history[1]["opted_in"] == ["optim.lr"]
    assert history[1]["changes"] == {"optim.lr": [0.003, 0.001], "train.resume_changes": ["refuse", "allow"]}
    assert history[1]["config_hash"] != history[0]["config_hash"]


def test_a_checkpoint_without_a_history_starts_one_with_its_own_config():
    old, new = cfg(), cfg("train.steps=2000")
    history = continued_history([], old, 1000, new, config_changes(old, new))
    assert [(e["from_step"], e["changes"]) for e in history] == [(0, {}), (1000, {"train.steps": [1000, 2000]})]


# ---------------------------------------------------------------- real runs through the command line
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A tiny run of 4 steps, trained once; each test works on its own copy."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", *BASE, f"train.run_dir={run_dir}"]) == 0
    return run_dir


@pytest.fixture
def run_dir(finished_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` (directories too) → the sha256 of its bytes ("dir" for a directory)."""
    return {p.relative_to(root).as_posix(): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def train(run_dir: Path, *overrides: str) -> int:
    return main(["train", *BASE, f"train.run_dir={run_dir}", *overrides])


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "config_history.jsonl").read_text().splitlines()]


def test_a_changed_config_is_refused_and_leaves_the_run_directory_byte_identical(run_dir, capsys):
    before = snapshot(run_dir)
    capsys.readouterr()
    assert train(run_dir, "optim.lr=1e-3", "train.seed=7", "data.split_seed=2", "train.steps=6") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("tarflow train: error: the checkpoint at step 4 in ")
    for described in ("optim.lr = 0.003 there, 0.001 here", "train.seed = 0 there, 7 here",
                      "data.split_seed = 0 there, 2 here", "train.steps = 4 there, 6 here"):
        assert described in err
    assert "train.resume_changes=allow" in err and "a new train.run_dir" in err
    assert snapshot(run_dir) == before


def test_another_model_is_refused_even_when_changes_are_allowed_and_nothing_is_written(run_dir, capsys):
    before = snapshot(run_dir)
    capsys.readouterr()
    assert train(run_dir, "model.channels=64", "train.resume_changes=allow") == 2
    err = capsys.readouterr().err
    assert "is of a different model: model.channels = 32 there, 64 here" in err
    assert "not even train.resume_changes=allow continues it" in err
    assert snapshot(run_dir) == before


def test_rerunning_a_finished_run_says_so_and_changes_nothing(run_dir, capsys):
    before = snapshot(run_dir)
    capsys.readouterr()
    assert train(run_dir, "logging.every=1") == 0  # a free change does not make it run again either
    out = capsys.readouterr().out
    assert out.strip() == (f"already finished: the checkpoint at step 4 in {run_dir / 'checkpoints'} reached "
                           f"train.steps=4; nothing to do (raise train.steps to train further)")
    assert snapshot(run_dir) == before


def test_a_run_stopped_during_its_last_step_does_its_end_on_the_rerun(run_dir, capsys):
    summary = json.loads((run_dir / "summary.json").read_text())
    (run_dir / "summary.json").write_text(json.dumps({**summary, "final_bits_per_dim": None, "preempted": "SIGTERM"}))
    checkpoints = snapshot(run_dir / "checkpoints")
    evals = len([r for r in records(run_dir) if "eval/bits_per_dim" in r])
    assert train(run_dir) == 0
    assert "resumed from step 4" in capsys.readouterr().out
    after = json.loads((run_dir / "summary.json").read_text())
    assert after["preempted"] is None and after["final_bits_per_dim"] == summary["final_bits_per_dim"]
    assert len([r for r in records(run_dir) if "eval/bits_per_dim" in r]) == evals + 1
    assert snapshot(run_dir / "checkpoints") == checkpoints  # the step-4 checkpoint was already there


def test_launch_and_logging_changes_continue_from_the_checkpoint(run_dir, capsys):
    assert train(run_dir, "train.steps=6", "logging.every=1", "data.num_workers=1") == 0
    out = capsys.readouterr().out
    assert "resumed from step 4" in out
    assert "note: continuing from step 4 under changed settings: data.num_workers 0 → 1" in out
    logged = [r["step"] for r in records(run_dir) if "train/loss" in r]
    assert logged == [2, 4, 5, 6]  # the first run's lines (every 2 steps), then every step from the checkpoint
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000004", "step-00000006"]
    assert "  steps: 6\n" in (run_dir / "config.yaml").read_text()
    entries = history(run_dir)
    assert [e["from_step"] for e in entries] == [0, 4]
    assert entries[1]["changes"]["train.steps"] == [4, 6] and entries[1]["opted_in"] == []


def test_an_allowed_change_continues_and_is_recorded_in_the_history_and_the_checkpoint(run_dir, capsys):
    assert train(run_dir, "train.steps=6", "optim.lr=1e-3", "logging.every=1", "train.resume_changes=allow") == 0
    assert "by train.resume_changes=allow: optim.lr 0.003 → 0.001" in capsys.readouterr().out
    # The schedule from step 5 on is the cosine to step 6 with the new peak (warmup 2, floor 1e-6).
    lr = {r["step"]: r["train/lr"] for r in records(run_dir) if "train/lr" in r}
    assert lr[5] == pytest.approx(1e-6 + 0.5 * (1 + math.cos(math.pi * (5 - 2) / (6 - 2))) * (1e-3 - 1e-6))
    last = history(run_dir)[-1]
    assert last["from_step"] == 4 and last["opted_in"] == ["optim.lr"]
    assert last["changes"]["optim.lr"] == [0.003, 0.001]
    saved = torch.load(run_dir / "checkpoints" / "step-00000006" / "run_state.pt", weights_only=True)
    assert saved["run"]["config_history"] == history(run_dir)  # S3-only checkpoints keep it too
    assert "  lr: 0.001\n" in (run_dir / "config.yaml").read_text()


def test_every_rank_refuses_alike_and_a_finished_run_is_left_alone_under_ddp(run_dir):
    """Two processes continuing the one-process run (another strategy is a launch change): both raise the same
    one-line error, neither waits for the other, and nothing is written; rerun as it was, it is finished."""
    args = ["-m", "tarflow", "train", *BASE, "train.strategy=ddp", f"train.run_dir={run_dir}"]
    before = snapshot(run_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-backend=c10d", *args, "optim.lr=1e-3"]
    refused = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0
    errors = [line for line in refused.stderr.splitlines() if line.startswith("tarflow train: error: ")]
    assert len(errors) == 2 and errors[0] == errors[1], refused.stderr[-3000:]
    assert "optim.lr = 0.003 there, 0.001 here" in errors[0]
    assert snapshot(run_dir) == before
    finished = torchrun(args)
    assert finished.stdout.count("already finished: the checkpoint at step 4") == 1  # rank 0 says it
    assert snapshot(run_dir) == before
