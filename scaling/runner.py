"""Running a study's points: locally in sequence, on SLURM as a job array, on Kubernetes as one job per point; the
study's state file; and collecting each point's result from its run directory.

A point is an ordinary ``tarflow train`` run in its own directory with ``train.resume=auto``, so:

- **finished** (``summary.json`` with the planned final step, not preempted, a finite bits/dim): skipped on every
  later run of the study — never launched again;
- **interrupted** (a checkpoint but no final summary; or stopped by a signal or its time limit): launched again and
  the trainer resumes from its newest checkpoint;
- **failed** (a non-zero exit that is not the preemption code): retried, resuming too, until it has failed
  ``1 + max_retries`` times; then it is reported failed with the tail of its log, and the other points go on.

``<study dir>/state.json`` records every point's attempts (start, seconds, exit status, outcome) and last error. Only
the driver writes it; cluster attempts are recorded by ``scaling.array_task`` in the point's own directory
(``attempts.jsonl``) and merged into the state by the next ``tarflow scale run``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable

from .results import PointResult
from .study import Point, StudyError, _atomic_write

STATE_FILE = "state.json"
LOG_FILE = "train.log"           # the local runner's capture of each attempt, appended
ATTEMPTS_FILE = "attempts.jsonl"  # cluster attempts, written by scaling.array_task
PREEMPTION_EXIT_CODE = 75         # cluster.slurm.PREEMPTION_EXIT_CODE, the trainer's default preemption.exit_code
TAIL_LINES = 20

Log = Callable[[str], None]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------- the state file
@dataclass
class PointState:
    status: str = "pending"          # pending | ok | failed | submitted | interrupted
    attempts: int = 0                # launches (a preempted launch counts; its resumption is another)
    failures: int = 0                # launches that failed (the retry budget counts these)
    wall_seconds: float = 0.0        # summed over attempts
    error: str = ""                  # the last failure's message (one line)
    error_tail: str = ""             # and the last lines of its output
    fingerprint: str = ""            # of the config and overrides it ran with
    job: dict = field(default_factory=dict)    # cluster: {"kind", "id", "task"} of the submission in flight
    merged_attempts: int = 0         # cluster attempt records already merged
    history: list = field(default_factory=list)
    fid_error: str = ""              # the last FID evaluation's failure ("" when it succeeded or never ran)
    fid_seconds: float = 0.0         # summed over FID evaluations

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class StudyState:
    def __init__(self, directory: Path, points: dict[str, PointState] | None = None):
        self.directory = Path(directory)
        self.points = points or {}

    @classmethod
    def load(cls, directory: str | Path) -> StudyState:
        path = Path(directory) / STATE_FILE
        if not path.is_file():
            return cls(Path(directory))
        raw = json.loads(path.read_text())
        names = set(PointState().__dict__)
        return cls(Path(directory), {n: PointState(**{k: v for k, v in d.items() if k in names})
                                     for n, d in raw.get("points", {}).items()})

    def save(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.directory / STATE_FILE, json.dumps(
            {"updated": _now(), "points": {n: s.to_dict() for n, s in self.points.items()}}, indent=2) + "\n")

    def __getitem__(self, name: str) -> PointState:
        return self.points.setdefault(name, PointState())


@contextlib.contextmanager
def study_lock(directory: Path):
    """One driver per study directory at a time (an advisory lock, released if the driver dies)."""
    import fcntl

    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise StudyError(f"another `tarflow scale run` is driving {directory} (pid {f.read().strip() or '?'}); "
                             f"wait for it or stop it") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------- a point's outcome
def read_summary(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / "summary.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def finished(point: Point) -> bool:
    """The run reached its final step, was not preempted, and evaluated a finite held-out bits/dim."""
    s = read_summary(point.run_dir)
    if not s or s.get("preempted") or int(s.get("step", -1)) < point.steps:
        return False
    bpd = s.get("final_bits_per_dim")
    return isinstance(bpd, (int, float)) and math.isfinite(bpd)


def error_line(tail: str) -> str:
    """The most telling line of a failed run's output: the trainer's "error:" line or the exception, else the
    last line."""
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    for pattern in (r"\berror: ", r"^[A-Za-z_.]*(Error|Exception)\b", r"(?i)error|killed|oom"):
        hits = [line for line in lines if re.search(pattern, line)]
        if hits:
            return hits[-1][:500]
    return lines[-1][:500] if lines else "no output"


def _tail(text: str, n: int = TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-n:])


def _read_from(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


# ---------------------------------------------------------------- local: one point after another
def trainer_command() -> list[str]:
    """``tarflow train`` with this interpreter (the same environment as the driver)."""
    return [sys.executable, "-m", "trainer.cli", "train"]


@dataclass
class LocalRunSummary:
    launched: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    fid_failed: list[str] = field(default_factory=list)
    interrupted: bool = False


class _Stop:
    """SIGINT/SIGTERM to the driver: pass SIGTERM on to the running point (it checkpoints at the next step and exits
    with the preemption code), record it, stop. A second signal kills the point."""

    def __init__(self):
        self.requested = 0
        self.child: subprocess.Popen | None = None
        self._saved = {}

    def __enter__(self):
        if _main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self.requested += 1
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM if self.requested == 1 else signal.SIGKILL)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def run_local(points: list[Point], state: StudyState, *, max_retries: int, config_text: str = "",
              retry_failed: bool = False, command: list[str] | None = None, env: dict | None = None,
              log: Log = print, fid=None) -> LocalRunSummary:
    """Run the unfinished points one after another in subprocesses; the state is saved after every attempt. With
    ``fid`` (a ``scaling.fid_eval.FidPlan``), every finished point's FID is evaluated right after it trains (or,
    for a point finished earlier, when it has no current FID)."""
    command = command or trainer_command()
    out = LocalRunSummary()

    def evaluate_fid(point: Point, st: PointState) -> None:
        from .fid_eval import run_fid

        if fid is not None and not stop.requested:
            if not run_fid(fid, point, st, log, stop) and not stop.requested:
                out.fid_failed.append(point.name)
            state.save()

    with _Stop() as stop:
        for point in points:
            if stop.requested:
                out.interrupted = True
                break
            st = state[point.name]
            if point.error:
                _config_failure(point, st, log)
                out.failed.append(point.name)
                state.save()
                continue
            if finished(point):
                _mark_finished(point, st, config_text, log)
                out.skipped.append(point.name)
                evaluate_fid(point, st)
                continue
            if st.status == "failed" and st.failures > max_retries and not retry_failed:
                log(f"[{point.name}] failed {st.failures} time(s), retries used up: not run again "
                    f"(--retry-failed runs it again): {st.error}")
                out.failed.append(point.name)
                continue
            if retry_failed and st.status == "failed":
                st.failures = 0
            ok = _run_point(point, st, state, max_retries, config_text, command, env, stop, log)
            out.launched.append(point.name)
            if stop.requested:
                out.interrupted = True
                log(f"stopped on request; `tarflow scale run` again resumes {point.name} and runs the rest")
                break
            if not ok:
                out.failed.append(point.name)
            else:
                evaluate_fid(point, st)
        if stop.requested:
            out.interrupted = True
    return out


def _config_failure(point: Point, st: PointState, log: Log) -> None:
    if st.status != "failed" or st.error != point.error:
        log(f"[{point.name}] not run: its config is invalid: {point.error}")
    st.status, st.error, st.error_tail = "failed", point.error, point.error


def _mark_finished(point: Point, st: PointState, config_text: str, log: Log) -> None:
    fp = point.fingerprint(config_text)
    if st.fingerprint and st.fingerprint != fp:
        log(f"[{point.name}] finished earlier with a different config (the study or its base config changed since); "
            f"kept. Delete {point.run_dir} to run it again")
    elif st.status != "ok":
        log(f"[{point.name}] finished: skipped")
    st.status = "ok"


def _run_point(point: Point, st: PointState, state: StudyState, max_retries: int, config_text: str,
               command: list[str], env: dict | None, stop: _Stop, log: Log) -> bool:
    run_dir = Path(point.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / LOG_FILE
    argv = [*command, *point.argv, "logging.progress=false"]
    child_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    last_step = -1
    while True:
        st.attempts += 1
        st.fingerprint = point.fingerprint(config_text)
        st.status = "running"
        started, t0 = _now(), time.perf_counter()
        state.save()
        with open(log_path, "ab") as f:
            f.write(f"\n=== attempt {st.attempts} {started}: {shlex.join(argv)}\n".encode())
            offset = f.tell()
            f.flush()
            log(f"[{point.name}] attempt {st.attempts}: {point.size}, {point.steps} steps, seed {point.seed} "
                f"(log: {log_path})")
            # A session of its own: a Ctrl-C at the terminal reaches the driver only, which asks the point to
            # checkpoint and stop (SIGTERM) instead of letting it die mid-step.
            child = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=child_env,
                                     start_new_session=True)
            stop.child = child
            rc = child.wait()
            stop.child = None
        seconds = time.perf_counter() - t0
        st.wall_seconds += seconds
        output = _read_from(log_path, offset)
        summary = read_summary(run_dir) or {}
        step = int(summary.get("step", -1))
        if rc == 0 and finished(point):
            outcome = "ok"
        elif stop.requested:
            outcome = "interrupted"
        elif rc == PREEMPTION_EXIT_CODE and step > last_step:
            outcome = "preempted"  # e.g. its own preemption.time_limit_minutes: resume at once
        else:
            outcome = "failed"
        st.history.append({"attempt": st.attempts, "started": started, "seconds": round(seconds, 3),
                           "returncode": rc, "outcome": outcome, "step": step})
        if outcome == "ok":
            st.status, st.error, st.error_tail = "ok", "", ""
            log(f"[{point.name}] done in {seconds:.1f} s: held-out bits/dim {summary['final_bits_per_dim']:.4f}")
            state.save()
            return True
        if outcome == "interrupted":
            st.status = "interrupted"
            state.save()
            return False
        if outcome == "preempted":
            last_step = step
            log(f"[{point.name}] stopped at step {step} (exit {rc}): resuming")
            state.save()
            continue
        st.failures += 1
        tail = _tail(output)
        if rc == 0:
            tail += f"\nexited 0 but {run_dir}/summary.json does not show step {point.steps} with a held-out bits/dim"
        st.error, st.error_tail = f"exit {rc}: {error_line(tail)}", tail
        if st.failures > max_retries:
            st.status = "failed"
            log(f"[{point.name}] FAILED {st.failures} time(s), giving up: {st.error}")
            state.save()
            return False
        log(f"[{point.name}] failed (exit {rc}): {error_line(tail)}; retry {st.failures} of {max_retries}")
        state.save()


# ---------------------------------------------------------------- cluster attempts (slurm array tasks, k8s pods)
def read_attempts(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / ATTEMPTS_FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


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


# ---------------------------------------------------------------- slurm: a job array
def slurm_array_job(points: list[Point], directory: Path, spec, job_name: str, array_file: Path):
    """A ``cluster.slurm.SlurmJob`` for an array of these points. Its batch script (requeue on preemption, USR1
    before the time limit) is the one every tarflow SLURM job has; srun runs ``scaling.array_task`` on each node
    instead of torchrun, which runs point ``$SLURM_ARRAY_TASK_ID``'s ``tarflow train`` (the same argv as locally,
    under torchrun when the point has several processes) and turns its preemption into the exit code the script
    requeues on."""
    from cluster.slurm import SlurmJob

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
    from cluster.slurm import submit

    in_flight = set(reconcile_cluster(points, state, max_retries, log)) if not dry_run else set()
    todo = _todo(points, state, in_flight, max_retries, retry_failed, config_text, log)
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
    _atomic_write(array_file, json.dumps({"points": entries}, indent=2) + "\n")
    try:
        sub = submit(job)
    except RuntimeError as e:  # no sbatch here, or sbatch refused
        raise StudyError(str(e)) from None
    for i, p in enumerate(todo):
        st = state[p.name]
        if retry_failed and st.status == "failed":
            st.failures = 0
        st.status, st.fingerprint = "submitted", p.fingerprint(config_text)
        st.job = {"kind": "slurm", "id": sub.job_id, "task": i, "submitted": _now(),
                  "records_before": len(read_attempts(p.run_dir))}
        Path(p.run_dir).mkdir(parents=True, exist_ok=True)
    state.save()
    log(f"submitted job array {sub.job_id} ({len(todo)} points, {array_file.name}); logs: {slurm_dir}/<job id>.out")
    return {"submitted": [p.name for p in todo], "job_id": sub.job_id, "in_flight": sorted(in_flight)}


def _todo(points: list[Point], state: StudyState, in_flight: set[str], max_retries: int, retry_failed: bool,
          config_text: str, log: Log) -> list[Point]:
    todo = []
    for p in points:
        st = state[p.name]
        if p.error:
            _config_failure(p, st, log)
        elif finished(p):
            _mark_finished(p, st, config_text, log)
            st.job = {}
        elif p.name in in_flight:
            st.status = "submitted"
        elif st.failures > max_retries and not retry_failed:
            st.status = "failed"
            log(f"[{p.name}] failed {st.failures} time(s), retries used up: not submitted again: {st.error}")
        else:
            todo.append(p)
    return todo


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


# ---------------------------------------------------------------- k8s: one job per point
def k8s_job_name(study: str, point: str) -> str:
    import hashlib

    stem = re.sub(r"[^a-z0-9-]+", "-", study.lower()).strip("-")[:26].rstrip("-") or "study"
    if not stem[0].isalpha():
        stem = "s" + stem[:25]
    return f"{stem}-{hashlib.sha1(point.encode()).hexdigest()[:8]}"


def k8s_jobs(points: list[Point], spec, directory: Path, config: str | None) -> list[tuple[Point, object]]:
    """A ``cluster.k8s.K8sJob`` per point; the point's run directory is ``run_root/points/<name>`` in the pods."""
    from cluster.k8s import K8sJob

    k = spec.run.k8s
    root = k.run_root.rstrip("/") or str(directory)
    config_text = Path(config).read_text() if config else None
    out = []
    for p in points:
        overrides = [a for a in p.argv[1 if config else 0:]
                     if not a.startswith(("train.run_dir=", "train.resume="))]
        job = K8sJob(name=k8s_job_name(spec.name, p.name), image=k.image, namespace=k.namespace, nodes=k.nodes,
                     gpus_per_node=k.gpus_per_node, nproc_per_node=k.nproc_per_node, cpu=k.cpu, memory=k.memory,
                     s3_secret=k.s3_secret, config_text=config_text, overrides=overrides,
                     run_dir=f"{root}/points/{p.name}",
                     checkpoint_uri=f"{k.checkpoint_prefix.rstrip('/')}/{p.name}" if k.checkpoint_prefix else None,
                     max_restarts=spec.run.max_retries, flavor=k.flavor, grace_s=k.grace_s, workdir=k.workdir,
                     env={"TARFLOW_SCALING_POINT": p.name})
        out.append((p, job))
    return out


def submit_k8s(points: list[Point], state: StudyState, spec, directory: Path, config: str | None, *,
               apply: bool = False, retry_failed: bool = False, config_text: str = "", log: Log = print) -> dict:
    """Render every unfinished point's manifests to ``<study dir>/k8s/<point>.yaml``; with ``apply``, kubectl apply
    them. Kubernetes retries a failed pod itself (``max_retries``)."""
    from cluster.k8s import apply as kubectl_apply
    from cluster.k8s import render, to_yaml

    in_flight = set(reconcile_cluster(points, state, spec.run.max_retries, log))
    todo = _todo(points, state, in_flight if apply else set(), spec.run.max_retries, retry_failed, config_text, log)
    out_dir = directory / "k8s"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for p, job in k8s_jobs(todo, spec, directory, config):
        objs = render(job)
        path = out_dir / f"{p.name}.yaml"
        _atomic_write(path, to_yaml(objs))
        written.append(str(path))
        if apply:
            try:
                log(kubectl_apply(objs).rstrip())
            except RuntimeError as e:
                state.save()
                raise StudyError(str(e)) from None
            st = state[p.name]
            st.status, st.fingerprint = "submitted", p.fingerprint(config_text)
            st.job = {"kind": "k8s", "id": job.name, "submitted": _now()}
    state.save()
    if not apply and written:
        log(f"rendered {len(written)} job(s) to {out_dir}/ (apply them with `kubectl apply -f {out_dir}` or "
            f"`tarflow scale run ... --apply`)")
    return {"submitted": [p.name for p in todo] if apply else [], "manifests": written,
            "in_flight": sorted(in_flight)}


# ---------------------------------------------------------------- results
def _metrics_model_record(run_dir: Path) -> dict:
    """The trainer's ``model/parameters`` and ``model/train_flops_per_image`` (logged once per attempt)."""
    path = run_dir / "metrics.jsonl"
    found: dict = {}
    if not path.is_file():
        return found
    for line in path.read_text().splitlines():
        if '"model/' not in line:
            continue
        with contextlib.suppress(ValueError):
            rec = json.loads(line)
            found.update({k: v for k, v in rec.items() if k.startswith("model/")})
    return found


def collect_results(points: list[Point], state: StudyState, fid: bool = False) -> list[PointResult]:
    """One ``PointResult`` per point. Parameters and FLOPs per image come from the run's own metrics when it logged
    them (they must agree with the plan); training FLOPs = FLOPs per image × images seen (steps × global batch).
    With ``fid``, each finished point's FID from ``<point>/fid/`` (its evaluation's error when it failed)."""
    from .fid_eval import read_fid

    results = []
    for p in points:
        st = state[p.name]
        run_dir = Path(p.run_dir)
        summary = read_summary(run_dir) or {}
        done = not p.error and finished(p)
        logged = _metrics_model_record(run_dir)
        params = int(logged.get("model/parameters", p.params_total))
        fpi = int(logged.get("model/train_flops_per_image", p.flops_per_image))
        if done and (params != p.params_total or fpi != p.flops_per_image):
            raise StudyError(f"{p.name}: the run logged {params} parameters and {fpi} FLOPs per image, the plan "
                             f"says {p.params_total} and {p.flops_per_image}: the run dir holds another model")
        step = int(summary.get("step", 0)) if done else p.steps
        images = step * p.global_batch
        wall = st.wall_seconds or float(summary.get("seconds", 0.0))
        if done:
            value, network = read_fid(run_dir) if fid else (None, "")
            results.append(PointResult(
                name=p.name, params_total=p.params_total, params_no_embed=p.params_no_embed,
                train_flops=float(fpi) * images, train_steps=step, images_seen=images, seed=p.seed,
                bits_per_dim=float(summary["final_bits_per_dim"]), wall_seconds=wall, status="ok",
                attempts=max(st.attempts, 1), fid=value, fid_network=network, grid=dict(p.grid),
                error=st.fid_error if fid and value is None else ""))
        elif st.status == "failed" or p.error:
            results.append(PointResult(
                name=p.name, params_total=p.params_total, params_no_embed=p.params_no_embed,
                train_flops=float(fpi) * images, train_steps=p.steps, images_seen=images, seed=p.seed,
                bits_per_dim=None, wall_seconds=wall, status="failed", attempts=st.attempts,
                error=st.error or p.error, grid=dict(p.grid)))
    return results


def pending(points: list[Point], state: StudyState) -> list[str]:
    """Points neither finished nor failed (not run yet, interrupted, or in flight on a cluster)."""
    return [p.name for p in points if not p.error and not finished(p) and state[p.name].status != "failed"]
