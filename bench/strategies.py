"""Training throughput and memory per strategy on this machine's CPU: single process vs DDP, FSDP2 and DeepSpeed
ZeRO-1/2/3 on 2 ranks (gloo), as ratios to single, measured in one run.

    .venv/bin/python bench/strategies.py [--steps 20] [--config configs/digits.yaml]
    .venv/bin/python bench/strategies.py --ema 0.999 [--rounds 2]   # the weight average's cost per strategy

Each case is a real `tarflow train` (2 ranks under torchrun) on the embedded digits with the same global batch;
images/s come from the run's metrics, peak memory is the largest resident set of any rank. With ``--ema`` every
strategy runs without and with ``train.ema.decay`` (interleaved, A B A B), and the step-time ratio of each pair is
printed: what updating the average after every step costs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(case: str, run_dir: Path, steps: int, config: str, port: int, extra: tuple[str, ...] = ()) -> dict:
    strategy, _, stage = case.partition("-zero")  # e.g. "deepspeed-zero3"
    overrides = [config, *extra, f"train.run_dir={run_dir}", f"train.steps={steps}", "schedule.warmup_steps=2",
                 "eval.at_start=false", "eval.every=0", "sample.num=2", f"logging.every={steps}",
                 "logging.progress=false", f"train.strategy={strategy}", "checkpoint.every=0"]
    if stage:
        overrides.append(f"deepspeed.stage={stage}")
    env = {**os.environ, "OMP_NUM_THREADS": "1" if strategy != "single" else "2", "DS_ACCELERATOR": "cpu"}
    if strategy == "single":
        cmd = [sys.executable, "-m", "tarflow", "train", *overrides]
    else:
        overrides.append("train.micro_batch=64")  # the same global batch (128) over 2 ranks
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv-backend=c10d",
               f"--rdzv-endpoint=127.0.0.1:{port}", "-m", "tarflow", "train", *overrides]
    # A fresh wrapper process per case: its children's peak RSS is this case's largest process (kilobytes).
    measure = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", measure, *cmd], cwd=REPO, env=env, check=True, capture_output=True,
                         text=True)
    wall = time.perf_counter() - start
    peak_mb = int(out.stdout.split()[-1]) / 1024
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rate = [r["train/images_per_second"] for r in records if "train/images_per_second" in r][-1]
    return {"images_per_second": rate, "peak_rss_mb": peak_mb, "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--config", default="configs/digits.yaml")
    parser.add_argument("--ema", type=float, default=0.0, help="measure the cost of train.ema.decay=EMA instead")
    parser.add_argument("--rounds", type=int, default=2, help="with --ema: pairs per strategy")
    args = parser.parse_args()
    cases = ("single", "ddp", "fsdp", "deepspeed-zero1", "deepspeed-zero2", "deepspeed-zero3")
    if args.ema:
        return ema_cost(cases, args)
    with tempfile.TemporaryDirectory() as tmp:
        results = {s: run(s, Path(tmp) / s, args.steps, args.config, 29700 + i) for i, s in enumerate(cases)}
    base = results["single"]
    print(f"{args.config}, {args.steps} steps, 2 CPU cores (single: 2 threads; ranks: 1 thread each)")
    print(f"{'strategy':<16}{'img/s':>10}{'× single':>10}{'peak RSS MB':>13}{'× single':>10}")
    for name, r in results.items():
        print(f"{name:<16}{r['images_per_second']:>10.0f}{r['images_per_second'] / base['images_per_second']:>10.2f}"
              f"{r['peak_rss_mb']:>13.0f}{r['peak_rss_mb'] / base['peak_rss_mb']:>10.2f}")


def ema_cost(cases, args) -> None:
    print(f"{args.config}, {args.steps} steps, train.ema.decay={args.ema} vs none, interleaved, 2 CPU cores")
    print(f"{'strategy':<16}{'img/s without':>15}{'img/s with':>12}{'step time with/without, per pair':>36}")
    port = 29800
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            pairs = []
            for k in range(args.rounds):
                port += 2
                off = run(case, Path(tmp) / f"{case}-{k}-off", args.steps, args.config, port)
                on = run(case, Path(tmp) / f"{case}-{k}-on", args.steps, args.config, port + 1,
                         (f"train.ema.decay={args.ema}",))
                pairs.append((off["images_per_second"], on["images_per_second"]))
            ratios = " ".join(f"{a / b:.3f}" for a, b in pairs)
            print(f"{case:<16}{sum(a for a, _ in pairs) / len(pairs):>15.0f}"
                  f"{sum(b for _, b in pairs) / len(pairs):>12.0f}{ratios:>36}")


if __name__ == "__main__":
    main()
