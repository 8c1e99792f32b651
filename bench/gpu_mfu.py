"""MFU on one GPU: the paper's ImageNet-64 TarFlow (P2-768-8-8, 1024 tokens × 12, class-conditional) trained in
bf16 for a minute per strategy, at the largest power-of-two batch that fits. Prints images/s, achieved TFLOP/s (the
analytic count of trainer/flops.py, 3 × forward) and MFU against the card's dense bf16 peak.

    .venv/bin/python bench/gpu_mfu.py [--seconds 60] [--strategies ddp,fsdp] [--compile]

Each strategy runs in its own `torchrun --nproc_per_node=1` process (so DDP/FSDP2 wrap the model as in a real run).
Record the output in bench/RESULTS.md with the date and the card.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def worker(strategy_name: str, seconds: float, compile_layers_: bool) -> None:
    import torch

    from cluster.env import discover
    from models import TarFlow, TarFlowConfig
    from trainer.activation_checkpointing import compile_layers
    from trainer.config import OptimConfig
    from trainer.distributed import process_group
    from trainer.flops import default_peak_flops, flops_per_image, mfu
    from trainer.strategies import build_strategy

    config = TarFlowConfig(in_channels=3, img_size=64, patch_size=2, channels=768, num_blocks=8, layers_per_block=8,
                           num_classes=1000)
    env, device = discover(), torch.device("cuda", 0)
    torch.cuda.set_device(device)
    torch.backends.cuda.matmul.allow_tf32 = True
    with process_group(env, device):
        torch.manual_seed(0)
        model = TarFlow(config)
        if compile_layers_:
            compile_layers(model)
        strategy = build_strategy(strategy_name, device, torch.bfloat16)
        strategy.setup(model, OptimConfig(lr=1e-4))

        def step(batch: int) -> None:
            x = torch.rand(batch, 3, 64, 64, device=device) * 2 - 1
            y = torch.randint(0, 1000, (batch,), device=device)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = TarFlow.loss(*strategy.model(x + 0.05 * torch.randn_like(x), y))
            strategy.backward(loss)
            strategy.step(1e-4, 1.0, torch.isfinite(loss))

        batch, best = 16, None
        while batch <= 4096:  # the largest power of two that fits
            try:
                step(batch)
                step(batch)
                torch.cuda.synchronize()
                best = batch
                batch *= 2
            except torch.OutOfMemoryError:
                break
            finally:
                torch.cuda.empty_cache()
        if best is None:
            raise SystemExit("not even a batch of 16 fits")
        torch.cuda.reset_peak_memory_stats()
        images, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            step(best)
            images += best
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        rate = images / elapsed
        flops = flops_per_image(config).train
        peak = default_peak_flops(device, torch.bfloat16)
        print(f"{strategy_name:<6} {torch.cuda.get_device_name(device)}  batch {best}  {rate:.1f} img/s  "
              f"{rate * flops / 1e12:.1f} TFLOP/s  MFU {mfu(rate * flops, peak):.1%}  "
              f"peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB  "
              f"(train FLOPs/image {flops:.3e}, peak {peak / 1e12:.0f} TFLOP/s)" if peak else
              f"{strategy_name}: {rate:.1f} img/s, unknown peak FLOPs for this card", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--strategies", default="ddp,fsdp")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.seconds, args.compile)
        return
    for i, name in enumerate(args.strategies.split(",")):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--rdzv-backend=c10d",
               f"--rdzv-endpoint=127.0.0.1:{29800 + i}", str(Path(__file__).resolve()), "--worker", name,
               "--seconds", str(args.seconds)] + (["--compile"] if args.compile else [])
        subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "4"}, check=False)


if __name__ == "__main__":
    main()
