"""``tarflow train --dry-run``: what a run would check and decide before its first step, with nothing written (the
tree is hashed before and after), each failure one line naming the thing to mend (exit code 2)."""

import hashlib
import itertools
import os
from pathlib import Path

import boto3
import pytest

from cluster.env import ProcessEnv
from data_pipeline.sources import Source, open_source
from data_pipeline.writer import write_dataset
from tarflow.main import main
from tarflow_testing.runs import TINY
from trainer.config import load_config
from trainer.dry_run import dry_run
from trainer.loop import train


def tree_digest(root: Path) -> str:
    """Every path under ``root`` with its kind, mode and content."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        stat = path.lstat()
        digest.update(f"{path.relative_to(root)} {stat.st_mode}".encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture
def unchanged(tmp_path, monkeypatch):
    """The test runs in ``tmp_path``, which must be as it was when the test ends."""
    monkeypatch.chdir(tmp_path)
    before = tree_digest(tmp_path)
    yield tmp_path
    assert tree_digest(tmp_path) == before


def dry(*args: str) -> int:
    return main(["train", "--dry-run", *args])


def test_the_default_run_is_checked_and_planned_without_writing_anything(unchanged, capsys):
    assert dry(f"train.run_dir={unchanged / 'run'}") == 0
    out = capsys.readouterr().out
    assert "ok  config: valid for 1 rank(s), train.strategy=single" in out
    assert "ok  data: embedded 'digits', 1,617 training and 180 held-out images" in out
    assert f"ok  train.run_dir: {unchanged / 'run'} would be created under {unchanged}, writable" in out
    assert "resume: start fresh at step 0 (no checkpoint in" in out
    assert "memory plan: single on 1 rank(s), fp32 compute" in out and "EMA" in out
    assert not (unchanged / "run").exists()


def test_a_launch_of_64_ranks_is_planned_from_one_process(unchanged, capsys):
    assert dry("--world-size", "64", "--nodes", "8", "train.strategy=fsdp", "train.global_batch=1024",
               "train.micro_batch=16", f"train.run_dir={unchanged / 'run'}") == 0
    out = capsys.readouterr().out
    assert "valid for 64 rank(s)" in out and "memory plan: fsdp (layer units) on 64 rank(s)" in out
    assert dry("--world-size", "3", f"train.run_dir={unchanged / 'run'}", "train.strategy=ddp") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "train.global_batch: 128 is not divisible by" in err and "128 × 3" in err


def test_deepspeed_plan_names_its_reduction_bucket(unchanged, capsys):
    cfg = load_config(None, ["train.strategy=deepspeed", "deepspeed.stage=3", "train.micro_batch=16",
                           f"train.run_dir={unchanged / 'r'}"],
                      world_size=8)
    report = dry_run(cfg, ProcessEnv(world_size=8, local_world_size=8, scheduler="torchrun"))
    assert report.plan.strategy == "deepspeed ZeRO-3"
    assert report.plan.state.buffers == 4 * 500_000_000  # DeepSpeed's default bucket, fp32
    assert "reduce_bucket_size" in report.format(cfg)


def _digits_shards(uri: str) -> None:
    src = open_source("digits")
    write_dataset(Source(src.name, src.num_classes, src.image_shape,
                         {"train": lambda: itertools.islice(src.splits["train"](), 64),
                          "heldout": lambda: itertools.islice(src.splits["heldout"](), 24)},
                         {"train": 64, "heldout": 24}), uri, "webdataset", shard_size=10600, encoding="png")


def test_shards_are_checked_against_their_manifest(tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    _digits_shards(str(data))
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    before = tree_digest(tmp_path)
    args = ["data.format=webdataset", f"data.uri={data}", f"train.run_dir={tmp_path / 'work' / 'run'}"]
    assert dry(*args) == 0
    out = capsys.readouterr().out
    assert "ok  data train: 64 images in" in out and "webdataset shard(s)" in out and f"under {data / 'train'}" in out
    assert "ok  data heldout: 24 images in" in out
    assert tree_digest(tmp_path) == before
    shard = sorted((data / "heldout").glob("*.tar"))[-1]
    shard.unlink()
    assert dry(*args, "data.verify=none") == 2  # the dry run checks presence whatever data.verify says
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"shard missing: {shard}" in err
    assert dry("data.format=webdataset", f"data.uri={tmp_path / 'nowhere'}") == 2
    assert "cannot read the dataset manifest" in capsys.readouterr().err


def test_the_resume_decision_is_the_one_the_run_would_take(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    common = [*TINY, "eval.at_start=false", f"train.run_dir={run_dir}"]
    train(load_config(None, [*common, "train.steps=3"]))
    before = tree_digest(tmp_path)
    assert dry(*common, "train.steps=6") == 0
    assert f"resume: resume from step 3 ({run_dir / 'checkpoints'}); note: continuing from step 3 under changed " \
           f"settings: train.steps 3 → 6" in capsys.readouterr().out
    assert dry(*common, "train.steps=3") == 0
    assert "resume: nothing to do: the checkpoint at step 3" in capsys.readouterr().out
    assert dry(*common, "train.steps=6", "optim.lr=1e-3") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "was written under another config: optim.lr = 0.003 there, 0.001 here" in err
    assert dry(*common, "train.steps=6", "train.resume=never") == 2
    assert "train.resume=never but" in capsys.readouterr().err
    assert dry(*common, f"train.resume={run_dir / 'checkpoints' / 'step-00000001'}") == 2
    assert "has no manifest" in capsys.readouterr().err
    assert tree_digest(tmp_path) == before


def test_s3_checkpoints_are_listed_and_probed_for_writing_without_an_object(unchanged, s3_bucket, capsys):
    uri = f"s3://{s3_bucket}/runs/a"
    assert dry(f"train.run_dir={unchanged / 'run'}", f"checkpoint.uri={uri}") == 0
    assert f"ok  checkpoints: {uri} reachable (0 object(s) under step-*), writable" in capsys.readouterr().out
    s3 = boto3.client("s3")
    assert s3.list_objects_v2(Bucket=s3_bucket).get("KeyCount") == 0
    assert not s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")
    assert dry(f"train.run_dir={unchanged / 'run'}", f"checkpoint.uri=s3://{s3_bucket}-missing/runs/a") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{s3_bucket}-missing" in err


def test_a_run_dir_that_cannot_be_made_is_named(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("x")
    (tmp_path / "locked").mkdir(mode=0o500)
    before = tree_digest(tmp_path)
    assert dry(f"train.run_dir={tmp_path / 'file' / 'run'}") == 2
    assert f"train.run_dir={str(tmp_path / 'file' / 'run')!r}: {tmp_path / 'file'} is a file" in \
        capsys.readouterr().err
    if os.geteuid() != 0:  # root may write anywhere
        assert dry(f"train.run_dir={tmp_path / 'locked' / 'run'}") == 2
        assert "is not writable by this user" in capsys.readouterr().err
    assert tree_digest(tmp_path) == before


def test_unreachable_data_is_a_failed_check_after_which_the_plan_still_prints(unchanged, capsys):
    assert dry("data.format=webdataset", f"data.uri={unchanged / 'nowhere'}", f"train.run_dir={unchanged / 'run'}",
               "--all-strategies") == 2
    out, err = capsys.readouterr()
    assert "ok  config: valid for 1 rank(s)" in out and "FAIL data: cannot read the dataset manifest" in out
    assert f"ok  checkpoints: {unchanged / 'run' / 'checkpoints'}" in out and "resume: start fresh" in out
    assert "memory plan: single on 1 rank(s)" in out and out.index("FAIL data") < out.index("memory plan")
    assert "per rank by strategy, GiB: 1 rank(s)" in out and "* single" in out and "deepspeed ZeRO-3" in out
    assert err.count("\n") == 1 and "dry run: 1 check(s) failed (FAIL above): data: cannot read" in err
