"""Training throughput and memory per strategy on this machine's CPU: single process vs DDP, FSDP2 and DeepSpeed
ZeRO-1/2/3 on 2 ranks (gloo), as ratios to single, measured in one run.

    .venv/bin/python bench/strategies.py [--steps 20] [--config configs/digits.yaml]
    .venv/bin/python bench/strategies.py --ema 0.999 [--rounds 2]   # the weight average's cost per strategy

Each case is a real `tarflow train` (2 ranks under torchrun) on the embedded digits with the same global batch;
images/s come from the run's metrics, peak memory is the largest resident set of any rank. With ``--ema`` every
strategy runs without and with ``train.ema.decay`` (interleaved, A B A B), and the step-time ratio of each pair is
printed: what updating the average after every step costs. Whole runs that short vary by ±15% from run to run on
this machine, so ``--ema`` also times the update itself inside the step loop of each strategy (2 ranks under
torchrun, same model and batch): its share of the step time, which is what the whole-run ratio cannot resolve.
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
    parser.add_argument("--ema-worker", default=None, help=argparse.SUPPRESS)  # the in-loop timing's processes
    parser.add_argument("--cases", nargs="+", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    cases = ("single", "ddp", "fsdp", "deepspeed-zero1", "deepspeed-zero2", "deepspeed-zero3")
    if args.ema_worker:
        return ema_worker(args)
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


def ema_share(cases, steps: int, config: str, decay: float) -> dict[str, float]:
    """Inside the step loop: seconds of ``update_ema`` over seconds of the optimizer step it follows, per strategy
    (single in this process, the others on 2 ranks under torchrun, in one launch)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "share.json"
        worker = [str(Path(__file__).resolve()), "--ema-worker", str(out), "--steps", str(steps), "--config", config,
                  "--ema", str(decay)]
        env = {**os.environ, "DS_ACCELERATOR": "cpu"}
        subprocess.run([sys.executable, *worker, "--cases", "single"], cwd=REPO, env={**env, "OMP_NUM_THREADS": "2"},
                       check=True, capture_output=True)
        shares = json.loads(out.read_text())
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv-backend=c10d",
                        "--rdzv-endpoint=127.0.0.1:29899", *worker, "--cases", *[c for c in cases if c != "single"]],
                       cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"}, check=True, capture_output=True)
        return {**shares, **json.loads(out.read_text())}


def ema_worker(args) -> None:
    """One process (single) or each of 2 ranks: time the step and the average's update separately."""
    import torch

    sys.path.insert(0, str(REPO))
    from cluster.env import discover
    from models import TarFlow
    from trainer.config import load_config
    from trainer.distributed import process_group
    from trainer.strategies import strategy_from_config

    env, device = discover(), torch.device("cpu")
    shares = {}
    with process_group(env, device):
        for case in args.cases:
            strategy_name, _, stage = case.partition("-zero")
            overrides = [f"train.strategy={strategy_name}", f"train.ema.decay={args.ema}",
                         f"train.micro_batch={128 // env.world_size}"] + ([f"deepspeed.stage={stage}"] if stage else [])
            cfg = load_config(args.config, overrides, world_size=env.world_size)
            strategy = strategy_from_config(cfg, device, None, env.world_size, nodes=1)
            torch.manual_seed(0)
            strategy.setup(TarFlow(cfg.model), cfg.optim)
            strategy.attach_ema(cfg.train.ema)
            m = cfg.model
            x = torch.rand(cfg.train.micro_batch, m.in_channels, m.img_size, m.img_size) * 2 - 1
            y = torch.randint(0, m.num_classes, (cfg.train.micro_batch,))
            step_s = ema_s = 0.0
            for k in range(args.steps):
                start = time.perf_counter()
                strategy.backward(TarFlow.loss(*strategy.model(x, y)))
                strategy.step(1e-4, 1.0, torch.tensor(True))
                middle = time.perf_counter()
                strategy.update_ema(k + 1)
                end = time.perf_counter()
                if k >= 3:  # past the first steps' allocations
                    step_s, ema_s = step_s + middle - start, ema_s + end - middle
            shares[case] = ema_s / step_s
    if env.is_main:
        Path(args.ema_worker).write_text(json.dumps(shares))


def ema_cost(cases, args) -> None:
    shares = ema_share(cases, args.steps, args.config, args.ema)
    print(f"{args.config}, {args.steps} steps, train.ema.decay={args.ema} vs none, interleaved, 2 CPU cores")
    print(f"{'strategy':<16}{'img/s without':>15}{'img/s with':>12}{'step time with/without, per pair':>36}"
          f"{'update / step, in-loop':>25}")
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
                  f"{sum(b for _, b in pairs) / len(pairs):>12.0f}{ratios:>36}{shares[case]:>25.4f}")


if __name__ == "__main__":
    main()
