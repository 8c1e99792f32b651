"""Run under torchrun as ``memory_plan_ranks.py SPEC.json``: what each strategy really holds on each rank, to hold
``tarflow train --dry-run``'s memory plan against. Knows nothing about the plan.

SPEC: ``{"out": DIR, "runs": [{"name": ..., "overrides": [key=value, ...]}]}``. For each run in turn (one launch,
one process group: starting the processes costs more than the steps) every rank builds the strategy the config
names, as the trainer does, trains two optimizer steps of random images (the first creates the optimizer state),
and after the second step's backward, before its update, walks what the strategy holds
(``tarflow_testing.memory.held_tensor_bytes``); then saves the strategy's checkpoint files and sums their sizes.
Writes ``DIR/<name>.json``: ``{"ranks": [{parameters, gradients, optimizer} per rank], "checkpoint_bytes"}``.
"""

import contextlib
import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from cluster.env import discover  # noqa: E402
from models import TarFlow  # noqa: E402
from tarflow_testing.memory import held_tensor_bytes  # noqa: E402
from trainer.activation_checkpointing import apply_activation_checkpointing  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.distributed import process_group  # noqa: E402
from trainer.strategies import strategy_from_config  # noqa: E402


def measure(overrides: list[str], env, device) -> dict:
    cfg = load_config(None, overrides, world_size=env.world_size)
    strategy = strategy_from_config(cfg, device, None, env.world_size, nodes=1)
    torch.manual_seed(cfg.train.seed)
    model = TarFlow(cfg.model)
    apply_activation_checkpointing(model, cfg.train.activation_checkpointing)
    strategy.setup(model, cfg.optim)
    if cfg.train.ema.decay > 0:
        strategy.attach_ema(cfg.train.ema)
    m, t = cfg.model, cfg.train
    accumulation = t.global_batch // (t.micro_batch * env.world_size)
    g = torch.Generator().manual_seed(env.rank)
    held = None
    for step in range(2):
        for micro in range(accumulation):
            x = torch.rand(t.micro_batch, m.in_channels, m.img_size, m.img_size, generator=g) * 2 - 1
            y = torch.randint(0, m.num_classes, (t.micro_batch,), generator=g) if m.num_classes else None
            last = micro == accumulation - 1
            with strategy.accumulating() if not last else contextlib.nullcontext():
                strategy.backward(TarFlow.loss(*strategy.model(x, y)) / accumulation)
        if step == 1:
            held = held_tensor_bytes(strategy)
        strategy.step(1e-3, cfg.optim.grad_clip, torch.tensor(True))
    with tempfile.TemporaryDirectory() as tmp:
        strategy.save_state(Path(tmp))
        written = torch.tensor([sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())],
                               dtype=torch.float64)
    if strategy.distributed:
        dist.all_reduce(written)  # every rank wrote its own files (DCP shards, ZeRO partitions)
    ranks = [None] * env.world_size
    dist.all_gather_object(ranks, held)
    return {"ranks": ranks, "checkpoint_bytes": int(written.item())}


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(spec["out"])
    env, device = discover(), torch.device("cpu")
    with process_group(env, device):
        for run in spec["runs"]:
            result = measure(run["overrides"], env, device)
            if env.rank == 0:
                (out / f"{run['name']}.json").write_text(json.dumps(result))
            dist.barrier()


if __name__ == "__main__":
    main()
