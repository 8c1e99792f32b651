"""One rank of the MDS loader's multi-rank tests: ``mds_ranks.py SPEC.json``, with RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT set. Every rank runs the spec's loader runs in turn in one gloo
process group (so that a test pays for the processes' start-up once) and writes what each run read as
``OUT/<run>.rank<r>.json``: per micro-batch the sample indices, labels and pixel sums. Launched by path, not as a
module (a ``tests`` package installed by a library would shadow ``-m tests.<name>``).

SPEC: ``{"uri", "seed", "num_canonical_nodes", "out", "runs": [{"name", "split", "batch", "global_batch",
"workers", "steps", "load", "save_after"}]}``. A train run reads ``steps`` optimizer steps (``global_batch /
(batch × world)`` micro-batches each), after loading the state file ``load`` if given; with ``save_after`` it reads
that many steps and saves its state as ``OUT/<run>.state<r>.pt``. A heldout run reads one epoch."""

import itertools
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from data_pipeline.config import DataConfig  # noqa: E402
from data_pipeline.mds_loader import MDSLoader  # noqa: E402


def _record(batches) -> dict:
    return {"indices": [b.indices.tolist() for b in batches], "labels": [b.labels.tolist() for b in batches],
            "pixels": [b.images.sum(dim=(1, 2, 3)).tolist() for b in batches]}


def _run(spec: dict, run: dict, rank: int, world: int, out: Path) -> dict:
    cfg = DataConfig(format="mds", uri=spec["uri"], num_workers=run["workers"],
                     num_canonical_nodes=spec["num_canonical_nodes"])  # cache_dir "": local rank 0's, shared
    with MDSLoader(cfg, run["split"], run["batch"], seed=spec["seed"], rank=rank, world_size=world,
                   global_batch=run.get("global_batch")) as loader:
        if run["split"] == "heldout":
            return {**_record(list(loader)), "cache": loader.cache_dir}
        if run.get("load"):
            loader.load_state_dict(torch.load(run["load"], weights_only=True))
        per_step = (run.get("global_batch") or run["batch"] * world) // (run["batch"] * world)
        steps = run["save_after"] if run.get("save_after") is not None else run["steps"]
        gen = iter(loader)
        batches = list(itertools.islice(gen, steps * per_step))
        gen.close()  # ends the epoch's DataLoader now (workers, streaming threads), as a stopped run would
        if run.get("save_after") is not None:
            torch.save(loader.state_dict(), out / f"{run['name']}.state{rank}.pt")
        return {**_record(batches), "batches_per_epoch": loader.batches_per_epoch}


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    out = Path(spec["out"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    for run in spec["runs"]:
        result = _run(spec, run, rank, world, out)
        (out / f"{run['name']}.rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()  # a saved state exists on every rank before a later run loads it
    dist.destroy_process_group()  # after the last barrier: local rank 0's cache outlives the others' reads


if __name__ == "__main__":
    main(sys.argv[1])
