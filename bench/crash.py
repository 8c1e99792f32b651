"""Crash consistency under many kills: a 2-rank DDP run checkpointing every step to S3 (moto's server on loopback,
every PUT slowed by a proxy so that kills land mid-upload) is killed with SIGKILL (all its processes) at random
moments, resumed, killed again, …, and finally runs to the end. After every kill all checkpoints with a manifest
must verify and the next attempt must resume from the newest; the finished run must equal an uninterrupted one.

    .venv/bin/python bench/crash.py [--kills 12] [--nproc 2] [--steps 120] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=12)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    from tarflow_testing.checkpoint_helpers import model_state
    from tarflow_testing.crash_harness import final_losses, run_with_kills
    from tarflow_testing.fault_proxy import FaultProxy
    from tarflow_testing.local_s3 import local_s3
    from tarflow_testing.runs import free_port

    started = time.perf_counter()
    with local_s3("crash") as url, tempfile.TemporaryDirectory() as tmp, FaultProxy(url) as proxy:
        proxy.delay_next(10**9, seconds=0.05, method="PUT")
        killed = run_with_kills(Path(tmp) / "killed", "s3://crash/killed", args.steps, args.kills, args.nproc,
                                args.seed, window=(0.3, 3.0), free_port=free_port)
        run_with_kills(Path(tmp) / "straight", "s3://crash/straight", args.steps, 0, args.nproc, args.seed,
                       free_port=free_port)
        a, b = model_state("s3://crash/straight"), model_state("s3://crash/killed")
        equal = all(torch.equal(a[k], b[k]) for k in a)
        same_losses = final_losses(Path(tmp) / "killed") == final_losses(Path(tmp) / "straight")
    print(f"{args.kills} kills of a {args.nproc}-rank run ({args.steps} steps, a checkpoint every step), "
          f"{time.perf_counter() - started:.0f} s")
    print("attempt  killed after (s)  during a save  resumed from step")
    for i, k in enumerate(killed.kills):
        after = "-" if k["killed_after_s"] is None else f"{k['killed_after_s']:.2f}"
        during = {True: "yes", False: "no", None: "-"}[k.get("during_save")]
        resumed = k["resumed_from"] if k["resumed_from"] is not None else "start"
        print(f"{i:>7}  {after:>16}  {during:>13}  {resumed:>17}")
    print(f"every kill: all manifests verified, resumed from the newest complete checkpoint; final model equal to "
          f"the uninterrupted run: {equal}; per-step losses equal: {same_losses}")
    if not (equal and same_losses):
        sys.exit(1)


if __name__ == "__main__":
    main()
