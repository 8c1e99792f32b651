"""Crash consistency: ``kill -9`` a training run (every process of it) at random moments while it saves and uploads
checkpoints to S3, resume it, and repeat; then let it finish. Shared by tests/test_crash.py (a few kills) and
bench/crash.py (many).

What must hold after every kill: every checkpoint with a manifest verifies (all files present, sizes and sha256 as
listed), the next attempt resumes from the newest of them, and the run that finally finishes equals one that was
never interrupted, bitwise.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.channels=32", "model.head_dim=16", "model.num_blocks=2", "model.layers_per_block=1",
        "train.global_batch=32", "schedule.warmup_steps=2", "optim.lr=3e-3", "eval.every=0", "eval.at_start=false",
        "sample.num=2", "logging.every=1", "logging.progress=false"]


@dataclass
class CrashReport:
    kills: list[dict] = field(default_factory=list)  # per kill: time, newest complete before and after, resumed
    final_equal: bool = False


def command(run_dir: Path, uri: str, steps: int, nproc: int, port: int, checkpoint_every: int = 1) -> list[str]:
    overrides = [*TINY, f"train.run_dir={run_dir}", f"checkpoint.uri={uri}", f"train.steps={steps}",
                 f"checkpoint.every={checkpoint_every}", "checkpoint.keep=2", f"train.micro_batch={32 // nproc}"]
    if nproc == 1:
        return [sys.executable, "-m", "tarflow", "train", *overrides]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
            f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-backend=c10d", "-m", "tarflow", "train",
            *overrides, "train.strategy=ddp"]


def newest_complete(uri: str) -> int | None:
    from tarflow_testing.checkpoint_helpers import steps
    found = steps(uri)
    return found[-1] if found else None


def verify_all(uri: str) -> None:
    from trainer.checkpoint.export import verify
    if newest_complete(uri) is None:
        return
    bad = [(step, why) for step, why in verify(uri) if why]
    assert not bad, f"a checkpoint with a manifest does not verify: {bad}"


def run_with_kills(run_dir: Path, uri: str, steps: int, kills: int, nproc: int, seed: int,
                   window: tuple[float, float] = (0.5, 4.0), free_port=None, checkpoint_every: int = 1,
                   before_last_attempt=None) -> CrashReport:
    """Start the run, kill -9 its whole process group after a random time once it is training, ``kills`` times;
    then let it finish. The caller points AWS_ENDPOINT_URL at an S3 endpoint (slowed down by a proxy so that a
    kill lands mid-upload). ``checkpoint_every``: 1 (a save in flight at almost any moment) for runs that are
    killed; an uninterrupted reference run (``kills=0``) may save less often (its final checkpoint is what counts).
    ``before_last_attempt``: called once the kills are done, before the attempt that runs to the end (e.g. to stop
    slowing uploads down: no kill will land in that attempt)."""
    rng = random.Random(seed)
    report = CrashReport()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for attempt in range(kills + 1):
        if attempt == kills and before_last_attempt is not None:
            before_last_attempt()
        before = newest_complete(uri)
        cmd = command(run_dir, uri, steps, nproc, free_port() if free_port else 29500 + attempt, checkpoint_every)
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        if attempt == kills:  # the last attempt runs to the end
            output = proc.communicate(timeout=600)[0]
            assert proc.returncode == 0, output[-3000:]
            _check_resumed_from(output, before, report, killed_at=None)
            break
        metrics = run_dir / "metrics.jsonl"
        started, mtime = time.monotonic(), _mtime(metrics)
        while proc.poll() is None and not (_mtime(metrics) > mtime and '"train/loss"' in metrics.read_text()):
            time.sleep(0.05)
            assert time.monotonic() - started < 120, "the run did not start training"
        delay = rng.uniform(*window)
        time.sleep(delay)
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before the kill; lengthen it: {proc.stdout.read()[-2000:]}")
        in_flight = any((run_dir / ".checkpoint-staging").glob("step-*/rank-*"))  # staged, not yet committed
        kill_all(proc, run_dir)
        output = proc.communicate()[0]
        verify_all(uri)
        _check_resumed_from(output, before, report, killed_at=delay)
        report.kills[-1]["during_save"] = in_flight
    return report


def kill_all(proc: subprocess.Popen, run_dir: Path) -> None:
    """SIGKILL the launcher and every worker: torchrun's workers live in process groups of their own, so they are
    found by the run directory on their command line."""
    os.killpg(proc.pid, signal.SIGKILL)
    pattern = f"train.run_dir={run_dir}"
    subprocess.run(["pkill", "-KILL", "-f", pattern], check=False)
    deadline = time.monotonic() + 30
    while subprocess.run(["pgrep", "-f", pattern], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "workers survived SIGKILL"
        subprocess.run(["pkill", "-KILL", "-f", pattern], check=False)
        time.sleep(0.05)


def _mtime(path: Path) -> float:
    return path.stat().st_mtime_ns if path.exists() else 0


def _check_resumed_from(output: str, before: int | None, report: CrashReport, killed_at: float | None) -> None:
    match = re.search(r"resumed from step (\d+)", output)
    resumed = int(match.group(1)) if match else None
    assert resumed == before, f"resumed from {resumed}, but the newest complete checkpoint was {before}"
    report.kills.append({"killed_after_s": killed_at, "resumed_from": resumed})


def final_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}
