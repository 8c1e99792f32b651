"""The local backend: a study's unfinished points one after another, each a ``tarflow train`` subprocess in its
own run directory with ``train.resume=auto``, so:

- **finished** (``summary.json`` with the planned final step, not preempted, a finite bits/dim): skipped on every
  later run of the study — never launched again;
- **interrupted** (a checkpoint but no final summary; or stopped by a signal or its time limit): launched again and
  the trainer resumes from its newest checkpoint;
- **failed** (a non-zero exit that is not the preemption code): retried, resuming too, until it has failed
  ``1 + max_retries`` times; then it is reported failed with the tail of its log, and the other points go on.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from cluster.run_contract import PREEMPTION_EXIT_CODE
from cluster.torchrun import tarflow_command

from .fid_eval import run_fid
from .plan import Point
from .rundir import LOG_FILE, SUMMARY_FILE, error_line, finished, last_lines, read_from, read_summary, utc_now
from .state import Log, PointState, StudyState, config_failure, mark_finished


def trainer_command() -> list[str]:
    """``tarflow train`` with this interpreter (the same environment as the driver)."""
    return tarflow_command("train")


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
                config_failure(point, st, log)
                out.failed.append(point.name)
                state.save()
                continue
            if finished(point):
                mark_finished(point, st, config_text, log)
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
        started, t0 = utc_now(), time.perf_counter()
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
        output = read_from(log_path, offset)
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
        tail = last_lines(output)
        if rc == 0:
            tail += f"\nexited 0 but {run_dir}/{SUMMARY_FILE} does not show step {point.steps} with a held-out bits/dim"
        st.error, st.error_tail = f"exit {rc}: {error_line(tail)}", tail
        if st.failures > max_retries:
            st.status = "failed"
            log(f"[{point.name}] FAILED {st.failures} time(s), giving up: {st.error}")
            state.save()
            return False
        log(f"[{point.name}] failed (exit {rc}): {error_line(tail)}; retry {st.failures} of {max_retries}")
        state.save()
