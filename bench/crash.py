"""Crash consistency under many kills: a 2-rank run (DDP, FSDP or ZeRO-3) checkpointing every step to S3 (moto's
server on loopback behind a fault proxy) is killed with SIGKILL (all its processes), resumed, killed again, …, and
finally runs to the end. Each kill is aimed, in a seeded mix, at one of three phases: a checkpoint upload (every PUT
slowed down), the next attempt's download of the checkpoint it resumes from (its GETs slowed down, killed before
training starts), or retention's deletion of old checkpoints (its deletes slowed down); whether it landed there is
measured from the requests the proxy was handling at the moment of the kill. After every kill all checkpoints with a
manifest must verify and the next attempt must resume from the newest; the finished run must equal an uninterrupted
one, bitwise, with the same per-step losses.

    .venv/bin/python bench/crash.py [--strategy ddp|fsdp|zero3] [--kills 12] [--kinds save,restore,retention]
                                    [--nproc 2] [--steps 400] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    from tarflow_testing.crash_harness import KINDS, STRATEGIES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategy", choices=sorted(STRATEGIES), default="ddp")
    parser.add_argument("--kills", type=int, default=12)
    parser.add_argument("--kinds", default=",".join(KINDS), help="the phases kills aim at, mixed evenly")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    kinds = tuple(args.kinds.split(","))
    if not set(kinds) <= set(KINDS):
        parser.error(f"--kinds: each of {', '.join(KINDS)}")

    import torch

    from tarflow_testing.checkpoint_helpers import model_state
    from tarflow_testing.crash_harness import CrashVerdict, final_losses, run_with_kills
    from tarflow_testing.fault_proxy import FaultProxy
    from tarflow_testing.local_s3 import local_s3
    from tarflow_testing.runs import free_port

    started = time.perf_counter()
    print(HEADER, flush=True)
    with local_s3("crash") as url, tempfile.TemporaryDirectory() as tmp, FaultProxy(url) as proxy:
        proxy.delay_next(10**9, seconds=0.05, method="PUT")
        try:
            # (the attempt after the last kill runs at full speed: no kill lands in it)
            killed = run_with_kills(Path(tmp) / "killed", "s3://crash/killed", args.steps, args.kills, args.nproc,
                                    args.seed, window=(0.3, 3.0), free_port=free_port, strategy=args.strategy,
                                    kinds=kinds, proxy=proxy, before_last_attempt=proxy.clear,
                                    on_attempt=lambda attempt, record: print(row(attempt, record), flush=True))
        except CrashVerdict as failed:
            print(f"FAILED: {failed}")
            sys.exit(1)
        killed_at = time.perf_counter()
        # The uninterrupted run saves only at its end: saving must not change training either.
        run_with_kills(Path(tmp) / "straight", "s3://crash/straight", args.steps, 0, args.nproc, args.seed,
                       free_port=free_port, checkpoint_every=args.steps, strategy=args.strategy)
        a, b = model_state("s3://crash/straight"), model_state("s3://crash/killed")
        equal = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        same_losses = final_losses(Path(tmp) / "killed") == final_losses(Path(tmp) / "straight")
    wall = time.perf_counter() - started
    print(f"{args.kills} kills of a {args.nproc}-rank {args.strategy} run ({args.steps} steps, a checkpoint every "
          f"step, keep=2), seed {args.seed}: {wall:.0f} s ({killed_at - started:.0f} s for the killed run)")
    aimed = Counter(k["kind"] for k in killed.kills if k["kind"])
    landed = Counter(k["kind"] for k in killed.kills if k["kind"] and k["landed"])
    print("kills per kind (landed in that phase / aimed): "
          + ", ".join(f"{kind} {landed[kind]}/{aimed[kind]}" for kind in kinds))
    staged = sum(1 for k in killed.kills if k["kind"] == "save" and k["during_save"])
    print(f"save kills with a checkpoint staged but not committed: {staged}/{aimed['save']}")
    resumes = sum(1 for k in killed.kills if k["resumed_from"] is not None)
    print(f"every kill: all manifests verified; every attempt that resumed ({resumes}) did so from the newest "
          f"complete checkpoint; final model equal to the uninterrupted run: {equal}; per-step losses equal: "
          f"{same_losses}")
    if not (equal and same_losses):
        sys.exit(1)


# landed: the proxy was handling a request of that phase all through the kill; staged: some rank's checkpoint
# files were staged locally and not yet committed (a save in flight, though maybe between two requests)
HEADER = ("attempt  aimed at   landed  staged  killed after (s)  resumed from  in flight at the kill (measured)"
          "            store after (complete | partial)")


def row(attempt: int, k: dict) -> str:
    """One attempt of the killed run, printed as soon as its checks passed (a failure is printed after them)."""
    kind = k["kind"] or "(finish)"
    landed = "-" if k["kind"] is None else ("yes" if k["landed"] else "no")
    staged = "-" if k["kind"] is None else ("yes" if k["during_save"] else "no")
    after = "-" if k["killed_after_s"] is None else f"{k['killed_after_s']:.2f}"
    resumed = k["resumed_from"] if k["resumed_from"] is not None else "-"
    flight = "; ".join(f"{phase}: {', '.join(reqs)}" for phase, reqs in k.get("in_flight", {}).items()) or "-"
    store = k.get("store")
    held = "-" if store is None else (f"{','.join(map(str, store['complete'])) or '-'} | "
                                      f"{','.join(map(str, store['partial'])) or '-'}")
    return f"{attempt:>7}  {kind:<9}  {landed:>6}  {staged:>6}  {after:>16}  {resumed!s:>12}  {flight:<44}  {held}"


if __name__ == "__main__":
    main()
