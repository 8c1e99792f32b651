"""How long training is blocked by a checkpoint save, next to how long the whole save takes (staging + upload to
S3 + commit), per strategy, on this machine: moto's S3 server on loopback, 2 ranks (gloo) for the distributed ones.

    .venv/bin/python bench/checkpoint.py [--channels 256] [--steps 12] [--every 4]

Each case is a real `tarflow train` with checkpoint.uri=s3://…; the figures are the run's own metrics
(checkpoint/blocked_seconds: the staging the step waits for; checkpoint/save_seconds: until the manifest is up).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=4)
    args = parser.parse_args()

    import boto3

    from tarflow_testing.local_s3 import local_s3
    from tarflow_testing.runs import free_port

    rows = []
    with local_s3("bench"), tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
        for case in ("single", "ddp", "fsdp", "deepspeed"):
            run_dir = Path(tmp) / case
            overrides = [f"model.channels={args.channels}", "model.head_dim=64", f"train.run_dir={run_dir}",
                         f"train.steps={args.steps}", f"checkpoint.every={args.every}", "checkpoint.keep=2",
                         f"checkpoint.uri=s3://bench/{case}", "eval.at_start=false", "eval.every=0", "sample.num=2",
                         "logging.progress=false", "schedule.warmup_steps=2", "train.global_batch=64",
                         f"train.micro_batch={64 if case == 'single' else 32}", f"train.strategy={case}"]
            cmd = [sys.executable, "-m", "tarflow", "train", *overrides] if case == "single" else \
                [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv-backend=c10d",
                 f"--rdzv-endpoint=127.0.0.1:{free_port()}", "-m", "tarflow", "train", *overrides]
            subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
            records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
            saves = [r for r in records if "checkpoint/save_seconds" in r]
            params = next(r["model/parameters"] for r in records if "model/parameters" in r)
            size = sum(o["Size"] for o in boto3.client("s3").list_objects_v2(
                Bucket="bench", Prefix=f"{case}/step-{args.steps:08d}/")["Contents"])
            blocked = sum(r["checkpoint/blocked_seconds"] for r in saves) / len(saves)
            total = sum(r["checkpoint/save_seconds"] for r in saves) / len(saves)
            rows.append((case, int(params), size, len(saves), blocked, total))
    print(f"checkpoint saves to S3 (moto on loopback), model channels={args.channels}; means over the saves of a run")
    print(f"{'strategy':<10}{'params':>10}{'MB/ckpt':>9}{'saves':>7}{'blocked s':>11}{'total s':>9}"
          f"{'blocked/total':>15}")
    for case, params, size, n, blocked, total in rows:
        print(f"{case:<10}{params:>10,}{size / 1e6:>9.1f}{n:>7}{blocked:>11.3f}{total:>9.3f}{blocked / total:>15.2f}")


if __name__ == "__main__":
    main()
