"""The memory plan of ``tarflow train --dry-run`` (``trainer/memory_plan.py``) against ``torch.cuda`` on one GPU.

    .venv/bin/python bench/gpu_memory.py [--sizes digits,imagenet64-s,imagenet64-paper] [--checkpointing 0,1]
                                         [--strategies single,ddp,fsdp,deepspeed:1,deepspeed:2,deepspeed:3]
                                         [--steps 3] [--ema 0.9999] [--out results.json]

For every model size, activation-checkpointing setting and strategy: a few bf16 training steps (Gaussian noise,
as the paper's runs; bf16 autocast, fp32 parameters and AdamW), then three figures against the plan's, as
measured / planned:

- ``state``: ``memory_allocated`` after the last backward, before its update (parameters, gradients, optimizer
  state, buffers), against ``state.held_at_step``;
- ``activations``: what the last forward left allocated, against ``activations.configured``;
- ``peak``: ``max_memory_allocated`` over the steps, against ``peak`` (which leaves out allocator slack, FSDP's
  gathered units and the optimizer's temporaries: expect a ratio above 1).

``--ema DECAY`` trains with ``train.ema.decay=DECAY``: the weight average is then in both the state and the plan.

Every strategy runs in its own ``torchrun --nproc_per_node=1`` process, so DDP, FSDP2 and DeepSpeed wrap the model
as in a real run, on ONE rank: this checks the plan's per-rank formulas at world size 1 only. The sharding itself
(world size > 1) needs several GPUs; on CPU it is measured for every strategy by tests/test_memory_plan.py. On a
machine without CUDA this script says so and exits 0 (``--cpu-smoke`` runs the tiny size on the CPU, figures
without meaning, to check the script itself).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Model sizes (config overrides) and the micro-batch each is measured at.
SIZES: dict[str, tuple[list[str], int]] = {
    "digits": ([], 128),  # the embedded default: 1.6M parameters
    "imagenet64-s": (["model.in_channels=3", "model.img_size=64", "model.patch_size=4", "model.channels=512",
                      "model.head_dim=64", "model.num_blocks=4", "model.layers_per_block=4",
                      "model.num_classes=1000"], 64),
    # the paper's ImageNet-64 model, P2-768-8-8: 1024 tokens, 453M parameters
    "imagenet64-paper": (["model.in_channels=3", "model.img_size=64", "model.patch_size=2", "model.channels=768",
                          "model.head_dim=64", "model.num_blocks=8", "model.layers_per_block=8",
                          "model.num_classes=1000"], 16),
}
STRATEGIES = ("single", "ddp", "fsdp", "deepspeed:1", "deepspeed:2", "deepspeed:3")


def overrides(size: str, strategy: str, checkpointing: int, ema: float = 0.0) -> list[str]:
    model, micro = SIZES[size]
    name, _, stage = strategy.partition(":")
    return [*model, f"train.micro_batch={micro}", f"train.global_batch={micro}", "train.noise=gaussian",
            "train.precision=bf16", f"train.activation_checkpointing={checkpointing}", f"train.strategy={name}",
            f"train.ema.decay={ema}", *([f"deepspeed.stage={stage}"] if stage else [])]


def measure(size: str, strategy_name: str, checkpointing: int, steps: int, device, ema: float = 0.0) -> dict:
    """One configuration in this process (its process group already made); the three figures and the plan's."""
    import gc

    import torch

    from models import TarFlow
    from trainer.activation_checkpointing import apply_activation_checkpointing
    from trainer.config import load_config
    from trainer.memory_plan import plan_memory
    from trainer.strategies import strategy_from_config

    cuda = device.type == "cuda"
    allocated = torch.cuda.memory_allocated if cuda else (lambda: 0)
    cfg = load_config(None, overrides(size, strategy_name, checkpointing, ema), world_size=1)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = allocated()
    strategy = strategy_from_config(cfg, device, torch.bfloat16, world_size=1, nodes=1)
    torch.manual_seed(0)
    model = TarFlow(cfg.model)
    apply_activation_checkpointing(model, checkpointing)
    strategy.setup(model, cfg.optim)
    if cfg.train.ema.decay > 0:
        strategy.attach_ema(cfg.train.ema)
    plan = plan_memory(cfg, 1, bf16=True, deepspeed_config=getattr(strategy, "ds_config", None))
    m, micro = cfg.model, cfg.train.micro_batch
    state = activations = 0
    for step in range(steps):
        x = torch.rand(micro, m.in_channels, m.img_size, m.img_size, device=device) * 2 - 1
        y = torch.randint(0, m.num_classes, (micro,), device=device) if m.num_classes else None
        before_forward = allocated()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = TarFlow.loss(*strategy.model(x + 0.05 * torch.randn_like(x), y))
        activations = allocated() - before_forward
        strategy.backward(loss)
        del loss
        state = allocated() - base - (x.numel() * x.element_size() if cuda else 0)  # the batch is no state
        strategy.step(1e-4, cfg.optim.grad_clip, torch.tensor(True, device=device))
        strategy.update_ema(step + 1)
    peak = torch.cuda.max_memory_allocated() - base if cuda else 0
    result = {"size": size, "strategy": strategy_name, "checkpointing": checkpointing, "ema": ema,
              "parameters": plan.parameters,
              "micro_batch": micro, "measured": {"state": state, "activations": activations, "peak": peak},
              "plan": {"state": plan.state.held_at_step, "activations": plan.activations.configured,
                       "peak": plan.peak}}
    del strategy, model
    gc.collect()
    return result


def worker(args: argparse.Namespace) -> None:
    import torch

    from cluster.env import discover
    from trainer.distributed import process_group

    device = torch.device("cuda", 0) if not args.cpu_smoke else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    with process_group(discover(), device):
        for size in args.sizes.split(","):
            for checkpointing in (int(k) for k in args.checkpointing.split(",")):
                try:
                    result = measure(size, args.worker, checkpointing, args.steps, device, args.ema)
                except torch.OutOfMemoryError as e:
                    result = {"size": size, "strategy": args.worker, "checkpointing": checkpointing,
                              "error": f"out of memory: {str(e).splitlines()[0]}"}
                    torch.cuda.empty_cache()
                print("RESULT " + json.dumps(result), flush=True)


def _mib(n: float) -> str:
    return f"{n / 2**20:10,.1f}"


def report(results: list[dict]) -> str:
    lines = [f"{'size':<17}{'strategy':<13}{'ckpt':>4}  {'state MiB meas/plan':>27}  "
             f"{'activations MiB meas/plan':>27}  {'peak MiB meas/plan':>27}"]
    for r in results:
        head = f"{r['size']:<17}{r['strategy']:<13}{r['checkpointing']:>4}"
        if "error" in r:
            lines.append(f"{head}  {r['error']}")
            continue
        cells = []
        for key in ("state", "activations", "peak"):
            measured, planned = r["measured"][key], r["plan"][key]
            ratio = f"{measured / planned:5.3f}" if planned else "  n/a"
            cells.append(f"{_mib(measured)} /{_mib(planned)} {ratio}")
        lines.append(f"{head}  " + "  ".join(cells))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--checkpointing", default="0,1", help="train.activation_checkpointing values")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--ema", type=float, default=0.0, help="train.ema.decay (0: no weight average)")
    parser.add_argument("--out", default="", help="also write the results as JSON here")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="run the digits size on the CPU to check the script (no memory figures)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    import torch

    if args.cpu_smoke:
        args.sizes = "digits"
    elif not torch.cuda.is_available():
        print("no CUDA device: bench/gpu_memory.py compares the memory plan with torch.cuda.max_memory_allocated "
              "on a GPU; nothing was measured (the CPU check of every strategy on 2 ranks is "
              "tests/test_memory_plan.py)")
        return
    if not args.cpu_smoke and torch.cuda.device_count() > 0:
        print(f"{torch.cuda.get_device_name(0)}; every strategy on ONE rank (world size 1): sharding over several "
              f"ranks needs several GPUs", flush=True)
    results = []
    for i, name in enumerate(args.strategies.split(",")):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--rdzv-backend=c10d",
               f"--rdzv-endpoint=127.0.0.1:{29830 + i}", str(Path(__file__).resolve()), "--worker", name,
               "--sizes", args.sizes, "--checkpointing", args.checkpointing, "--steps", str(args.steps),
               "--ema", str(args.ema)] \
            + (["--cpu-smoke"] if args.cpu_smoke else [])
        env = {**os.environ, "OMP_NUM_THREADS": "4", **({"DS_ACCELERATOR": "cpu"} if args.cpu_smoke else {})}
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
        found = [json.loads(line[len("RESULT "):]) for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not found:
            print(f"{name}: the worker failed (exit {done.returncode}):\n{done.stderr[-2000:]}", flush=True)
        results += found
        print(report(found).split("\n", 1)[-1], flush=True)
    print(report(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
