"""The study's state file, ``<study dir>/state.json``: every point's attempts (start, seconds, exit status,
outcome), failures and last error. Only the driver writes it, under ``study_lock``; cluster attempts are recorded
by ``scaling.array_task`` in the point's own directory (``attempts.jsonl``) and merged by ``scaling.reconcile``.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .plan import Point
from .rundir import atomic_write, utc_now
from .spec import StudyError

STATE_FILE = "state.json"

Log = Callable[[str], None]


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
        atomic_write(self.directory / STATE_FILE, json.dumps(
            {"updated": utc_now(), "points": {n: s.to_dict() for n, s in self.points.items()}}, indent=2) + "\n")

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


# ---------------------------------------------------------------- a point's status, as every backend sees it
def config_failure(point: Point, st: PointState, log: Log) -> None:
    """A point whose config does not resolve: failed, never launched (said once)."""
    if st.status != "failed" or st.error != point.error:
        log(f"[{point.name}] not run: its config is invalid: {point.error}")
    st.status, st.error, st.error_tail = "failed", point.error, point.error


def mark_finished(point: Point, st: PointState, config_text: str, log: Log) -> None:
    """A point found finished: ok, and never launched again (even when its config changed since: said so)."""
    fp = point.fingerprint(config_text)
    if st.fingerprint and st.fingerprint != fp:
        log(f"[{point.name}] finished earlier with a different config (the study or its base config changed since); "
            f"kept. Delete {point.run_dir} to run it again")
    elif st.status != "ok":
        log(f"[{point.name}] finished: skipped")
    st.status = "ok"
