"""The SLURM backend: a study's unfinished points as one job array (one array task per point), whose batch script
is ``cluster.slurm``'s (requeue on preemption, USR1 before the time limit); each task runs ``scaling.array_task``.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

from cluster.slurm import SlurmJob, submit

from .plan import Point
from .reconcile import reconcile_cluster, to_submit
from .rundir import atomic_write, read_attempts, utc_now
from .spec import StudyError
from .state import Log, StudyState


def slurm_array_job(points: list[Point], directory: Path, spec, job_name: str, array_file: Path):
    """A ``cluster.slurm.SlurmJob`` for an array of these points. Its batch script (requeue on preemption, USR1
    before the time limit) is the one every tarflow SLURM job has; srun runs ``scaling.array_task`` on each node
    instead of torchrun, which runs point ``$SLURM_ARRAY_TASK_ID``'s ``tarflow train`` (the same argv as locally,
    under torchrun when the point has several processes) and turns its preemption into the exit code the script
    requeues on."""
    s = spec.run.slurm
    array = f"--array=0-{len(points) - 1}" + (f"%{s.max_parallel}" if s.max_parallel else "")
    return SlurmJob(run_dir=str(directory), nodes=s.nodes, gpus_per_node=s.gpus_per_node,
                    nproc_per_node=s.nproc_per_node, cpus_per_task=s.cpus_per_task, time=s.time,
                    partition=s.partition, account=s.account, signal_grace_s=s.signal_grace_s,
                    max_restarts=s.max_restarts, job_name=job_name, extra_sbatch=[array, *s.extra_sbatch],
                    workdir=os.getcwd(), command=[sys.executable, "-m", "scaling.array_task", str(array_file)])


def submit_slurm(points: list[Point], state: StudyState, spec, directory: Path, *, max_retries: int,
                 retry_failed: bool = False, config_text: str = "", dry_run: bool = False,
                 log: Log = print) -> dict:
    """Submit the points that are neither finished, in flight, nor out of retries as one job array."""
    in_flight = set(reconcile_cluster(points, state, max_retries, log)) if not dry_run else set()
    todo = to_submit(points, state, in_flight, max_retries, retry_failed, config_text, log)
    if not todo:
        state.save()
        return {"submitted": [], "in_flight": sorted(in_flight), "job_id": None}
    slurm_dir = directory / "slurm"
    k = len(list(slurm_dir.glob("array-*.json"))) if slurm_dir.is_dir() else 0
    array_file = slurm_dir / f"array-{k:03d}.json"
    job_name = re.sub(r"[^A-Za-z0-9._-]", "-", spec.run.slurm.job_name or f"scale-{spec.name}")
    job = slurm_array_job(todo, directory, spec, job_name, array_file)
    entries = [{"name": p.name, "run_dir": p.run_dir, "argv": p.argv, "nproc_per_node": job.nproc_per_node}
               for p in todo]
    if dry_run:
        sub = submit(job, dry_run=True)
        return {"submitted": [p.name for p in todo], "job_id": None, "script": sub.text,
                "array": entries, "in_flight": []}
    slurm_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(array_file, json.dumps({"points": entries}, indent=2) + "\n")
    try:
        sub = submit(job)
    except RuntimeError as e:  # no sbatch here, or sbatch refused
        raise StudyError(str(e)) from None
    for i, p in enumerate(todo):
        st = state[p.name]
        if retry_failed and st.status == "failed":
            st.failures = 0
        st.status, st.fingerprint = "submitted", p.fingerprint(config_text)
        st.job = {"kind": "slurm", "id": sub.job_id, "task": i, "submitted": utc_now(),
                  "records_before": len(read_attempts(p.run_dir))}
        Path(p.run_dir).mkdir(parents=True, exist_ok=True)
    state.save()
    log(f"submitted job array {sub.job_id} ({len(todo)} points, {array_file.name}); logs: {slurm_dir}/<job id>.out")
    return {"submitted": [p.name for p in todo], "job_id": sub.job_id, "in_flight": sorted(in_flight)}



def wait_slurm(points: list[Point], state: StudyState, spec, directory: Path, *, max_retries: int,
               config_text: str = "", poll_s: float = 15.0, log: Log = print) -> None:
    """Submit, wait for the array, resubmit failed and interrupted points (within the retries), until none is left."""
    while True:
        result = submit_slurm(points, state, spec, directory, max_retries=max_retries, config_text=config_text,
                              log=log)
        if not result["submitted"] and not result["in_flight"]:
            return
        while reconcile_cluster(points, state, max_retries, log):
            time.sleep(poll_s)
