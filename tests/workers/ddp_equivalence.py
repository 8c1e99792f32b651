"""Run under torchrun: k optimizer steps with DDP on every rank, then (rank 0) the same steps in one process on the
whole global batch; writes both loss sequences and the largest parameter difference to the JSON path argv[1]."""

import contextlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from cluster.env import discover  # noqa: E402
from models import TarFlow, TarFlowConfig  # noqa: E402
from trainer.config import OptimConfig  # noqa: E402
from trainer.distributed import process_group  # noqa: E402
from trainer.strategy import DistributedDataParallel, SingleDevice  # noqa: E402

CONFIG = TarFlowConfig(in_channels=1, img_size=8, patch_size=2, channels=32, head_dim=16, num_blocks=2,
                       layers_per_block=1, num_classes=10)
GLOBAL_BATCH, MICRO_STEPS, STEPS = 8, 2, 4


def global_batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.rand(GLOBAL_BATCH, 1, 8, 8, generator=g) * 2 - 1, torch.randint(-1, 10, (GLOBAL_BATCH,), generator=g))
            for _ in range(STEPS)]


def run(strategy, parts: int, part: int):
    torch.manual_seed(0)
    strategy.setup(TarFlow(CONFIG), OptimConfig(lr=1e-3))
    losses = []
    for x, y in global_batches():
        x, y = x.chunk(parts)[part], y.chunk(parts)[part]
        step_loss = 0.0
        for i, (xm, ym) in enumerate(zip(x.chunk(MICRO_STEPS), y.chunk(MICRO_STEPS))):
            with strategy.accumulating() if i < MICRO_STEPS - 1 else contextlib.nullcontext():
                loss = TarFlow.loss(*strategy.model(xm, ym))
                strategy.backward(loss / MICRO_STEPS)
            step_loss += loss.item() / MICRO_STEPS
        strategy.step(1e-3, 1.0, torch.tensor(True))
        losses.append(step_loss)
    return losses, {k: v.detach().clone() for k, v in strategy.unwrapped.state_dict().items()}


def main() -> None:
    env, device = discover(), torch.device("cpu")
    with process_group(env, device):
        if env.rank == 0:  # the one-process reference first: no rank may leave while another still computes
            ref_losses, ref_params = run(SingleDevice(device), 1, 0)
        losses, params = run(DistributedDataParallel(device), env.world_size, env.rank)
        mean = torch.tensor(losses, dtype=torch.float64)
        dist.all_reduce(mean)
        losses = (mean / env.world_size).tolist()
        if env.rank == 0:
            rel = max(((params[k] - ref_params[k]).abs().max() / ref_params[k].abs().max().clamp_min(1e-12)).item()
                      for k in params)
            Path(sys.argv[1]).write_text(json.dumps({"ddp": losses, "single": ref_losses, "max_rel_param": rel}))
        dist.barrier()


if __name__ == "__main__":
    main()
