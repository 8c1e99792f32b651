"""Interrupt and resume with checkpoints in S3 (moto's server on loopback), for every strategy, on real processes:
the resumed run reproduces the uninterrupted one bitwise (CPU, fp32, fixed seeds)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
import torch

from tarflow.main import main
from tarflow_testing.checkpoint_helpers import model_state, steps
from tarflow_testing.runs import REPO, TINY, free_port
from trainer.checkpoint import CheckpointError
from trainer.config import load_config
from trainer.loop import train

STEPS = ["train.steps=12", "checkpoint.every=4", "checkpoint.keep=5", "eval.at_start=false", "train.ema.decay=0.8"]


def torchrun(args, nproc=2, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
           f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-backend=c10d", "-m", "tarflow", "train", *args]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def copy_prefix(bucket: str, source: str, target: str) -> None:
    s3 = boto3.client("s3")
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=source):
        for obj in page.get("Contents", []):
            s3.copy_object(Bucket=bucket, Key=target + obj["Key"][len(source):],
                           CopySource={"Bucket": bucket, "Key": obj["Key"]})


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def run(strategy: str, run_dir: Path, uri: str, *extra: str, nproc: int = 2, check: bool = True):
    overrides = [*TINY, *STEPS, f"train.strategy={strategy}", f"train.run_dir={run_dir}", f"checkpoint.uri={uri}",
                 "logging.every=1", *extra]
    if strategy == "single":
        return train(load_config(None, overrides))
    return torchrun(overrides, nproc=nproc, check=check)


@pytest.mark.parametrize("strategy", ["single", "ddp", "fsdp", "deepspeed"])
def test_resume_from_s3_reproduces_the_uninterrupted_run(tmp_path, s3_bucket, strategy, capsys):
    straight = f"s3://{s3_bucket}/straight"
    run(strategy, tmp_path / "straight", straight)
    assert steps(straight) == [4, 8, 12]
    # A run that was interrupted after its step-8 checkpoint: a new place holding only that checkpoint.
    copy_prefix(s3_bucket, "straight/step-00000008/", "crashed/step-00000008/")
    resumed = run(strategy, tmp_path / "crashed", f"s3://{s3_bucket}/crashed")
    if strategy != "single":
        assert "resumed from step 8" in resumed.stdout
    for weights in ("raw", "ema"):  # the weight average too, bit for bit
        a = model_state(f"{straight}/step-00000012", weights)
        b = model_state(f"s3://{s3_bucket}/crashed/step-00000012", weights)
        for key in a:
            assert torch.equal(a[key], b[key]), (weights, key)
    after = {s: v for s, v in losses(tmp_path / "straight").items() if s > 8}
    assert losses(tmp_path / "crashed") == after  # steps 9-12 only, each with the uninterrupted run's loss
    # The final held-out bits/dim covers all 180 images on any number of ranks, and one process evaluating the
    # checkpoint agrees: each image's dequantisation noise is keyed by its index, whichever rank evaluates it.
    records = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["eval/images"] for r in records if "eval/images" in r] == [180]
    capsys.readouterr()
    assert main(["eval", f"{straight}/step-00000012", "--device", "cpu"]) == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    summary = json.loads((tmp_path / "straight" / "summary.json").read_text())
    assert report["weights"] == summary["weights"] == "ema"  # both default to the run's average
    assert report["images"] == 180
    assert report["bits_per_dim"] == pytest.approx(summary["final_bits_per_dim"], rel=1e-9)


@pytest.mark.alone  # a second SIGTERM 0.3 s after the first: see tests/conftest.py
def test_sigterm_saves_exits_with_the_requeue_code_and_resumes_exactly(tmp_path, s3_bucket):
    """SIGTERM to torchrun's agent (what Kubernetes does to a pod): both ranks stop at the same step boundary, save
    to S3, wait for the upload and exit with 75; a second SIGTERM during the save changes nothing. The resumed run
    matches a run that was never interrupted."""
    overrides = [*TINY, "train.strategy=ddp", "train.steps=80", "checkpoint.every=40", "eval.at_start=false",
                 "logging.every=1", "logging.progress=false", "sample.num=2", "train.ema.decay=0.8"]
    uri = f"s3://{s3_bucket}/preempted"
    run_dir = tmp_path / "preempted"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-backend=c10d", "-m", "tarflow", "train",
           *overrides, f"train.run_dir={run_dir}", f"checkpoint.uri={uri}"]
    agent = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (run_dir / "metrics.jsonl").exists() or len(losses(run_dir)) < 5:
        assert time.monotonic() < deadline and agent.poll() is None, "the run did not start"
        time.sleep(0.2)
    agent.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    time.sleep(0.3)
    if agent.poll() is None:
        agent.send_signal(signal.SIGTERM)  # impatient: a second signal while the ranks save
    output = agent.communicate(timeout=60)[0]
    took = time.monotonic() - signalled
    marker = json.loads((run_dir / "preempted.json").read_text())
    stopped = marker["step"]
    assert marker["exit_code"] == 75 and marker["reason"] == "SIGTERM" and 5 <= stopped < 80
    assert output.count(f"stopped at step {stopped} (SIGTERM)") == 2, output[-3000:]  # both ranks, same step
    assert took < 30, f"{took:.1f} s from SIGTERM to exit: torchrun would SIGKILL at 30 s"
    assert steps(uri)[-1] == stopped  # a complete checkpoint of the step it stopped at
    print(f"SIGTERM → checkpoint in S3 → exit: {took:.2f} s (step {stopped})")

    run("ddp", run_dir, uri, *overrides[len(TINY):])  # the requeued attempt: resume=auto
    straight = tmp_path / "straight"
    run("ddp", straight, f"s3://{s3_bucket}/straight", *overrides[len(TINY):])
    for weights in ("raw", "ema"):
        a, b = model_state(f"s3://{s3_bucket}/straight", weights), model_state(uri, weights)
        for key in a:
            assert torch.equal(a[key], b[key]), (weights, key)
    assert losses(run_dir) == losses(straight)  # every step once, each with the uninterrupted run's loss
    assert not (run_dir / "preempted.json").exists()


def test_time_limit_stops_like_a_preemption(tmp_path):
    cfg = load_config(None, [*TINY, f"train.run_dir={tmp_path}", "train.steps=100000", "eval.at_start=false",
                             "preemption.time_limit_minutes=0.05", "checkpoint.every=0"])
    result = train(cfg)
    assert result.preempted == "time limit of 3 s" and 0 < result.step < 100000
    assert steps(tmp_path / "checkpoints") == [result.step]


def test_resuming_a_different_model_names_the_differing_keys(tmp_path):
    train(load_config(None, [*TINY, f"train.run_dir={tmp_path}", "train.steps=4", "eval.at_start=false"]))
    with pytest.raises(CheckpointError, match=r"different model: model.channels = 32 there, 64 here, "
                                              r"model.head_dim = 16 there, 32 here"):
        train(load_config(None, [*TINY, f"train.run_dir={tmp_path}", "train.steps=6", "model.channels=64",
                                 "model.head_dim=32"]))


def test_a_checkpoint_of_another_format_is_refused_with_the_strategy_to_use(tmp_path):
    run("fsdp", tmp_path, str(tmp_path / "ck"), "train.steps=4", nproc=1)
    result = run("ddp", tmp_path, str(tmp_path / "ck"), "train.steps=8", check=False)
    assert result.returncode != 0
    assert "written by train.strategy=fsdp (dcp format), which train.strategy=ddp cannot resume" in result.stderr


def test_no_credential_reaches_logs_manifests_metrics_or_saved_configs(tmp_path, s3_server, monkeypatch, capfd):
    secret, key_id = "SECRET-do-not-log-7f3a9c", "AKIA-do-not-log-42"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    bucket = "creds-check"
    boto3.client("s3").create_bucket(Bucket=bucket)
    train(load_config(None, [*TINY, f"train.run_dir={tmp_path}", "train.steps=4", "checkpoint.every=2",
                             f"checkpoint.uri=s3://{bucket}/ck"]))
    out, err = capfd.readouterr()
    texts = [out, err] + [p.read_bytes().decode("latin-1") for p in tmp_path.rglob("*") if p.is_file()]
    s3 = boto3.client("s3")
    for obj in s3.list_objects_v2(Bucket=bucket)["Contents"]:
        texts.append(s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read().decode("latin-1"))
    assert len(texts) > 10
    for text in texts:
        assert secret not in text and key_id not in text
