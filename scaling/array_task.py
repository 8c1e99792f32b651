"""One task of a study's SLURM job array: ``python -m scaling.array_task ARRAY_FILE``.

The array's batch script is ``cluster.slurm``'s, unchanged: srun runs this once per node in place of torchrun
(``SlurmJob.command``). It picks the point of ``$SLURM_ARRAY_TASK_ID`` from the array file and runs that point's
``tarflow train`` (the local runner's argv: ``train.resume=auto``, its own run dir) as a child — directly for a
one-process point, under torchrun (c10d on the allocation's first node) for several — and

- passes on the signals that ask the trainer to checkpoint and stop (SLURM's USR1 through the batch shell and srun,
  SIGTERM on preemption);
- exits with the preemption code when the trainer stopped for preemption, also under torchrun, which reports its
  ranks' codes as 1: the point's ``preempted.json`` says so (the batch script's own check looks in the study
  directory, shared by every task, so it is not relied on). The batch script then requeues the task;
- on node 0, appends the attempt (job id, seconds, exit status, the tail of its output) to
  ``<run dir>/attempts.jsonl`` for the driver to merge into the study's state.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from cluster.env import slurm_master_port
from cluster.hostlist import first_host
from cluster.run_contract import PREEMPTION_EXIT_CODE, preempted_path
from cluster.torchrun import tarflow_program, torchrun_command

from .rundir import ATTEMPTS_FILE, utc_now

FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)


def child_argv(entry: dict, environ: dict) -> list[str]:
    """The trainer, or torchrun over it when the point runs more than one process."""
    trainer = tarflow_program("train", *entry["argv"], "logging.progress=false")
    nproc = int(entry.get("nproc_per_node") or 1)
    nnodes = int(environ.get("SLURM_NNODES", "1") or 1)
    if nproc * nnodes == 1:
        return [sys.executable, *trainer]
    head = first_host(environ["SLURM_JOB_NODELIST"])
    port = slurm_master_port(environ["SLURM_JOB_ID"])
    return torchrun_command(trainer, nnodes=nnodes, nproc_per_node=nproc, rdzv_endpoint=f"{head}:{port}",
                            rdzv_id=environ["SLURM_JOB_ID"])


def run(array_file: str, task: int | None = None, environ: dict | None = None) -> int:
    environ = dict(os.environ if environ is None else environ)
    entries = json.loads(Path(array_file).read_text())["points"]
    if task is None:
        value = environ.get("SLURM_ARRAY_TASK_ID")
        if value is None or not value.isdigit():
            print(f"scaling.array_task: SLURM_ARRAY_TASK_ID is {value!r}: not a job array task", file=sys.stderr)
            return 2
        task = int(value)
    if not 0 <= task < len(entries):
        print(f"scaling.array_task: task {task} but {array_file} lists {len(entries)} points", file=sys.stderr)
        return 2
    entry = entries[task]
    run_dir = Path(entry["run_dir"])
    node0 = environ.get("SLURM_NODEID", "0") == "0"
    preempted_file = preempted_path(run_dir)
    if node0:
        run_dir.mkdir(parents=True, exist_ok=True)
        preempted_file.unlink(missing_ok=True)  # an earlier attempt's must not speak for this one
        print(f"[scaling] array task {task}: point {entry['name']} in {run_dir}", flush=True)
    started, t0 = utc_now(), time.perf_counter()
    child = subprocess.Popen(child_argv(entry, environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             env=environ)

    def forward(signum, frame):
        if child.poll() is None:
            child.send_signal(signum)

    # Restored when the child is done: run() is also called in-process (tests, a driver), where a handler left
    # behind would forward the caller's later signals to a child that no longer exists.
    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    tail: collections.deque[str] = collections.deque(maxlen=20)

    def pump():  # the child's output goes on to the job's log; its last lines are kept for the attempt record
        for raw in iter(child.stdout.readline, b""):
            line = raw.decode(errors="replace")
            tail.append(line.rstrip("\n"))
            sys.stdout.write(line)
            sys.stdout.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    reader.join(timeout=10)
    if rc not in (0, PREEMPTION_EXIT_CODE) and preempted_file.is_file():
        print(f"[scaling] the trainer stopped for preemption ({preempted_file.read_text().strip()}): exit "
              f"{PREEMPTION_EXIT_CODE}", flush=True)
        rc = PREEMPTION_EXIT_CODE
    if node0:
        record = {"started": started, "seconds": round(time.perf_counter() - t0, 3), "returncode": rc,
                  "job": environ.get("SLURM_JOB_ID", ""), "array_job": environ.get("SLURM_ARRAY_JOB_ID", ""),
                  "task": task, "restart": int(environ.get("SLURM_RESTART_COUNT", "0") or 0),
                  "tail": "\n".join(tail) if rc not in (0, PREEMPTION_EXIT_CODE) else ""}
        with open(run_dir / ATTEMPTS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
    return rc


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m scaling.array_task ARRAY_FILE", file=sys.stderr)
        return 2
    return run(args[0])


if __name__ == "__main__":
    sys.exit(main())
