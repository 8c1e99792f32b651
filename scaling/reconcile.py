"""What the cluster backends share: folding the attempt records a cluster wrapper wrote (``scaling.array_task`` on
SLURM) into the study's state, asking the scheduler which points are still in flight, and choosing what to submit.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Iterable

from cluster.run_contract import PREEMPTION_EXIT_CODE

from .plan import Point
from .rundir import error_line, finished, read_attempts
from .state import Log, PointState, StudyState, config_failure, mark_finished


def merge_cluster_attempts(point: Point, st: PointState) -> None:
    """Fold the attempt records a cluster wrapper wrote since the last merge into the state."""
    records = read_attempts(point.run_dir)
    for rec in records[st.merged_attempts:]:
        st.attempts += 1
        st.wall_seconds += float(rec.get("seconds", 0.0))
        rc = int(rec.get("returncode", 1))
        outcome = "ok" if rc == 0 else "preempted" if rc == PREEMPTION_EXIT_CODE else "failed"
        st.history.append({**rec, "attempt": st.attempts, "outcome": outcome})
        if outcome == "failed":
            st.failures += 1
            st.error_tail = rec.get("tail", "")
            st.error = f"exit {rc}: {error_line(st.error_tail)}"
    st.merged_attempts = len(records)


def _slurm_in_flight(job_ids: Iterable[str]) -> dict[str, set[int]] | None:
    """Array job id → the task indices SLURM still holds (pending, running, requeued); None if squeue is missing."""
    out: dict[str, set[int]] = {}
    for job_id in sorted(set(job_ids)):  # one at a time: squeue fails for all ids if it no longer knows one
        try:
            done = subprocess.run(["squeue", "-h", "-r", "-j", job_id, "-o", "%F %K %T"], capture_output=True,
                                  text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return None
        out[job_id] = set()
        if done.returncode != 0:  # "Invalid job id": long gone
            continue
        for line in done.stdout.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == job_id and parts[1].isdigit():
                out[job_id].add(int(parts[1]))
    return out


def reconcile_cluster(points: list[Point], state: StudyState, max_retries: int, log: Log = print) -> list[str]:
    """Update every submitted point from its attempt records and the scheduler; returns the points still in flight.
    A point whose task ended unfinished is "interrupted" (launched again) until it has failed 1 + max_retries
    times, then "failed"."""
    slurm_jobs = {st.job["id"] for p in points if (st := state[p.name]).job.get("kind") == "slurm"}
    queued = _slurm_in_flight(slurm_jobs) if slurm_jobs else {}
    in_flight = []
    for p in points:
        st = state[p.name]
        merge_cluster_attempts(p, st)
        if not st.job:
            continue
        # A task still in the queue is in flight even when its summary is written: its wrapper has yet to record
        # the attempt. Without squeue we cannot tell, and assume it still runs.
        if st.job.get("kind") == "slurm" and (queued is None or int(st.job["task"]) in queued.get(st.job["id"], set())):
            in_flight.append(p.name)
            continue
        if finished(p):
            st.status, st.job, st.error, st.error_tail = "ok", {}, "", ""
            continue
        if st.job.get("kind") == "slurm":
            if not read_attempts(p.run_dir)[st.job.get("records_before", 0):]:
                st.failures += 1  # the task ended without running the point (cancelled, or failed to start)
                st.error = (f"slurm task {st.job['id']}_{st.job['task']} ended without running the point "
                            f"(cancelled or failed to start; see {Path(p.run_dir).parent.parent / 'slurm'})")
            st.status = "failed" if st.failures > max_retries else "interrupted"
            st.job = {}
        elif st.job.get("kind") == "k8s":
            in_flight.append(p.name)  # Kubernetes retries by itself (backoffLimit); results appear in run_dir
    state.save()
    return in_flight


def to_submit(points: list[Point], state: StudyState, in_flight: set[str], max_retries: int, retry_failed: bool,
              config_text: str, log: Log) -> list[Point]:
    """The points to submit: neither finished, in flight, invalid, nor out of retries."""
    todo = []
    for p in points:
        st = state[p.name]
        if p.error:
            config_failure(p, st, log)
        elif finished(p):
            mark_finished(p, st, config_text, log)
            st.job = {}
        elif p.name in in_flight:
            st.status = "submitted"
        elif st.failures > max_retries and not retry_failed:
            st.status = "failed"
            log(f"[{p.name}] failed {st.failures} time(s), retries used up: not submitted again: {st.error}")
        else:
            todo.append(p)
    return todo
