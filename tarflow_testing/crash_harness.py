"""Crash consistency: ``kill -9`` a training run (every process of it) at chosen moments while it works with its
checkpoints in S3, resume it, and repeat; then let it finish. Shared by tests/test_crash.py (a few kills) and
bench/crash.py (many).

A kill is aimed at one of three phases (``KINDS``):
- ``save``: a seeded time into training, at the next checkpoint PUT in flight (the caller slows every PUT down);
- ``restore``: while the attempt after a kill downloads the checkpoint it resumes from, before training starts
  (each checkpoint GET is held ``GET_DELAY_S`` here, so that a restore lasts seconds);
- ``retention``: while ``checkpoint.keep`` deletes old checkpoints after a commit (each DeleteObjects is held
  ``DELETE_DELAY_S``).
Whether a kill landed in its phase is measured, not assumed, from what the fault proxy was handling all through the
moment of the kill: a checkpoint PUT (save), a checkpoint GET (restore: the run logs no loss until its restore is
done), a DeleteObjects (retention).

What must hold after every kill: every checkpoint with a manifest verifies (all files present, sizes and sha256 as
listed), the next attempt resumes from the newest of them, and the run that finally finishes equals one that was
never interrupted, bitwise.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.channels=32", "model.head_dim=16", "model.num_blocks=2", "model.layers_per_block=1",
        "train.global_batch=32", "schedule.warmup_steps=2", "optim.lr=3e-3", "eval.every=0", "eval.at_start=false",
        "sample.num=2", "logging.every=1", "logging.progress=false"]
STRATEGIES = {"ddp": ["train.strategy=ddp"], "fsdp": ["train.strategy=fsdp"],
              "zero3": ["train.strategy=deepspeed", "deepspeed.stage=3"]}
KINDS = ("save", "restore", "retention")
GET_DELAY_S = 0.4     # a restore then lasts seconds: about ten files for ZeRO-3, four for FSDP, two for DDP
DELETE_DELAY_S = 0.5  # retention makes two DeleteObjects per old checkpoint (the manifest first, then the rest)
# DeepSpeed's first start on CPU compiles a communication extension (a minute under load)
STARTUP_TIMEOUT_S = 300


@dataclass
class CrashReport:
    kills: list[dict] = field(default_factory=list)  # per attempt: kind, timing, what was in flight, resumed from
    final_equal: bool = False


class CrashVerdict(AssertionError):
    """A check failed after a kill; ``report`` holds every attempt so far, the failing one last."""

    def __init__(self, message: str, report: CrashReport):
        super().__init__(message)
        self.report = report


def command(run_dir: Path, uri: str, steps: int, nproc: int, port: int, checkpoint_every: int = 1,
            strategy: str = "ddp") -> list[str]:
    overrides = [*TINY, f"train.run_dir={run_dir}", f"checkpoint.uri={uri}", f"train.steps={steps}",
                 f"checkpoint.every={checkpoint_every}", "checkpoint.keep=2", f"train.micro_batch={32 // nproc}"]
    if nproc == 1 and strategy == "ddp":
        return [sys.executable, "-m", "tarflow", "train", *overrides]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
            f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-backend=c10d", "-m", "tarflow", "train",
            *overrides, *STRATEGIES[strategy]]


def kill_plan(kills: int, kinds: tuple[str, ...], seed: int) -> list[str]:
    """Each kind as often as the others, in a seeded order; the first kill never aims at a restore (the first
    attempt has nothing to restore)."""
    plan = [kinds[i % len(kinds)] for i in range(kills)]
    random.Random(f"kill-plan-{seed}").shuffle(plan)  # its own stream: the kill delays stay as they were
    if plan and plan[0] == "restore":
        other = next((i for i, kind in enumerate(plan) if kind != "restore"), None)
        if other is not None:
            plan[0], plan[other] = plan[other], plan[0]
    return plan


def newest_complete(uri: str) -> int | None:
    from tarflow_testing.checkpoint_helpers import steps
    found = steps(uri)
    return found[-1] if found else None


def store_state(uri: str) -> dict[str, list[int]]:
    """Steps with a manifest (complete) and step prefixes without one (partial: a save or deletion cut short)."""
    from trainer.checkpoint import CheckpointManager, Ranks
    from trainer.stores import open_store
    prefixes = CheckpointManager(open_store(uri), Path(tempfile.gettempdir()), Ranks()).prefixes()
    return {"complete": sorted(s for s, c in prefixes.items() if c),
            "partial": sorted(s for s, c in prefixes.items() if not c)}


def bad_checkpoints(uri: str) -> list[tuple[int, str]]:
    """Checkpoints with a manifest that do not verify, and why."""
    from trainer.checkpoint.export import verify
    if newest_complete(uri) is None:
        return []
    return [(step, why) for step, why in verify(uri) if why]


@dataclass
class _Attempt:
    proc: subprocess.Popen
    metrics: Path
    resumes_from: int | None  # the newest complete checkpoint when it started
    started: float = field(default_factory=time.monotonic)
    wall_started: float = field(default_factory=time.time)  # on the file system's clock

    def __post_init__(self) -> None:
        self.file_before = _file_identity(self.metrics)

    def trained(self) -> bool:
        """It logged a training loss (it is past its resume). Not a count of records: a resumed run first drops
        the records of the steps after its checkpoint, then logs them again."""
        if _file_identity(self.metrics) == self.file_before:
            return False
        lines = [line for line in self.metrics.read_text().splitlines() if '"train/loss"' in line]
        try:
            last = json.loads(lines[-1])["step"] if lines else -1
        except json.JSONDecodeError:  # a record being written: the run is training
            return True
        return last > (self.resumes_from if self.resumes_from is not None else -1)


def run_with_kills(run_dir: Path, uri: str, steps: int, kills: int, nproc: int, seed: int,
                   window: tuple[float, float] = (0.5, 4.0), free_port=None, checkpoint_every: int = 1,
                   before_last_attempt=None, strategy: str = "ddp", kinds: tuple[str, ...] = ("save",),
                   proxy=None, on_attempt=None) -> CrashReport:
    """Start the run, kill -9 all its processes at a moment aimed at one of ``kinds`` (in a seeded mix), ``kills``
    times; then let it finish. The caller points AWS_ENDPOINT_URL at an S3 endpoint, slowed down by a proxy so that
    a kill lands mid-upload; ``proxy`` (a FaultProxy, required for ``restore`` and ``retention``) also slows the
    restore's GETs and retention's deletes while such a kill is aimed, and measures what each kill cut short.
    ``window``: seconds of training before a ``save`` kill. ``checkpoint_every``: 1 (a save in flight at almost any
    moment) for runs that are killed; an uninterrupted reference run (``kills=0``) may save less often (its final
    checkpoint is what counts). ``before_last_attempt``: called once the kills are done, before the attempt that runs
    to the end (e.g. to stop slowing uploads down: no kill will land in that attempt). ``on_attempt(attempt, record)``:
    called with each attempt's record as soon as it is checked (for progress on long runs)."""
    assert proxy is not None or set(kinds) <= {"save"}, "aiming at restores or retention needs the fault proxy"
    rng = random.Random(seed)
    report = CrashReport()
    plan = kill_plan(kills, kinds, seed)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    metrics = run_dir / "metrics.jsonl"
    for attempt in range(kills + 1):
        last = attempt == kills
        if last and before_last_attempt is not None:
            before_last_attempt()
        before = newest_complete(uri)
        cmd = command(run_dir, uri, steps, nproc, free_port() if free_port else 29500 + attempt, checkpoint_every,
                      strategy)
        rules = [] if last else _slow_down(proxy, plan[attempt], uri)
        run = _Attempt(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, start_new_session=True), metrics, before)
        if last:  # the last attempt runs to the end
            output = run.proc.communicate(timeout=3600)[0]
            assert run.proc.returncode == 0, output[-3000:]
            record = {"kind": None, "killed_after_s": None, "resumed_from": _resumed_from(output)}
            report.kills.append(record)
            _check(report, attempt, record, before, trained=True, bad=[])
            if on_attempt is not None:
                on_attempt(attempt, record)
            break
        try:
            _aim(plan[attempt], run, proxy, uri, rng, window)
            staged = _staged_since(run_dir, run.wall_started)
            t0, t1 = kill_all(run.proc, run_dir)
        except BaseException:
            kill_all(run.proc, run_dir)
            raise
        finally:
            for rule in rules:
                proxy.remove(rule)
        output = run.proc.communicate()[0]
        if proxy is not None:
            proxy.wait_idle()  # requests already sent still take effect: the store settles only after them
        trained = run.trained()
        phases = _phases(proxy, uri, t0, t1) if proxy is not None else {}
        record = {"kind": plan[attempt], "killed_after_s": t0 - run.started, "landed": plan[attempt] in phases,
                  "in_flight": phases, "during_save": staged, "trained": trained,
                  "resumed_from": _resumed_from(output), "store": store_state(uri) if uri.startswith("s3://")
                  else None}
        report.kills.append(record)
        _check(report, attempt, record, before, trained, bad_checkpoints(uri))
        if on_attempt is not None:
            on_attempt(attempt, record)
    return report


def _slow_down(proxy, kind: str, uri: str) -> list:
    """The proxy rules that stretch the phase a kill of ``kind`` aims at (removed after the kill)."""
    if kind == "restore":
        return [proxy.delay_next(10**9, seconds=GET_DELAY_S, method="GET", path_contains=_object_path(uri))]
    if kind == "retention":
        return [proxy.delay_next(10**9, seconds=DELETE_DELAY_S, method="POST", path_contains=_delete_path(uri))]
    return []


def _aim(kind: str, run: _Attempt, proxy, uri: str, rng: random.Random, window: tuple[float, float]) -> None:
    """Return at the moment to kill: a seeded random time into the phase that ``kind`` aims at."""
    if kind == "save":
        _wait(run, run.trained, "start training")
        time.sleep(rng.uniform(*window))
        if proxy is not None:  # then at once when an upload is in flight (most of a step is compute, not PUTs)
            _wait(run, lambda: bool(proxy.in_flight("PUT", _object_path(uri))), "upload a checkpoint")
    elif kind == "restore":
        # The download has begun once the proxy holds one of its GETs; if there is nothing to restore the attempt
        # trains instead, and is killed at once (measured: not in a restore).
        _wait(run, lambda: run.trained() or _began(proxy, "GET", _object_path(uri), run.started), "start resuming")
        if not run.trained():
            time.sleep(rng.uniform(0, 2.5 * GET_DELAY_S))
    elif kind == "retention":
        _wait(run, lambda: run.trained() and bool(proxy.in_flight("POST", _delete_path(uri))), "delete a checkpoint")
        time.sleep(rng.uniform(0, DELETE_DELAY_S))
    else:
        raise ValueError(f"unknown kind of kill {kind!r}; expected one of {KINDS}")
    if run.proc.poll() is not None:
        raise AssertionError(f"the run ended before the kill; lengthen it: {run.proc.stdout.read()[-2000:]}")


def _wait(run: _Attempt, ready, what: str) -> None:
    while not ready():
        if run.proc.poll() is not None:
            raise AssertionError(f"the run ended before it could {what}: {run.proc.stdout.read()[-2000:]}")
        assert time.monotonic() - run.started < STARTUP_TIMEOUT_S, f"the run did not {what}"
        time.sleep(0.02)


def _began(proxy, method: str, path: str, since: float) -> bool:
    return any(e.started >= since for e in proxy.in_flight(method, path))


def _phases(proxy, uri: str, t0: float, t1: float) -> dict[str, list[str]]:
    """The phases the kill cut short, each with the requests the proxy was handling throughout it."""
    def held(method: str, path: str) -> list[str]:  # "PUT step-00000012/run.pt", "POST /bucket?delete"
        return [f"{e.method} {'step-' + e.target.split('/step-', 1)[1] if '/step-' in e.target else e.target}"
                for e in proxy.in_flight_over(t0, t1, method, path)]

    # Each phase has requests of its own: checkpoint PUTs only in a save, checkpoint GETs only in a restore (the
    # harness verifies between attempts, never during one), DeleteObjects only in retention.
    found = {"save": held("PUT", _object_path(uri)), "restore": held("GET", _object_path(uri)),
             "retention": held("POST", _delete_path(uri))}
    return {phase: requests for phase, requests in found.items() if requests}


def _object_path(uri: str) -> str:
    """The request path of a checkpoint's objects (path-style addressing, as boto3 uses for a loopback endpoint)."""
    url = urlsplit(uri)
    return f"/{url.netloc}/{url.path.strip('/')}/step-".replace("//", "/")


def _delete_path(uri: str) -> str:
    return f"/{urlsplit(uri).netloc}?delete"


def kill_all(proc: subprocess.Popen, run_dir: Path) -> tuple[float, float]:
    """SIGKILL the launcher and every worker, all within a fraction of a millisecond; returns the (monotonic) times
    just before and just after. torchrun's workers live in process groups of their own, so they are found by the
    run directory on their command line (the search again afterwards catches any started meanwhile)."""
    pattern = f"train.run_dir={run_dir}"
    found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
    t0 = time.monotonic()
    for pid in (int(p) for p in found):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    t1 = time.monotonic()
    deadline = time.monotonic() + 30
    while subprocess.run(["pgrep", "-f", pattern], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "workers survived SIGKILL"
        subprocess.run(["pkill", "-KILL", "-f", pattern], check=False)
        time.sleep(0.05)
    return t0, t1


def _staged_since(run_dir: Path, since: float) -> bool:
    """A save of this attempt is staged and not yet committed (a killed attempt's staging stays behind, so only
    what was written since the attempt started counts)."""
    def written_since(path: Path) -> bool:
        try:
            return path.stat().st_mtime >= since
        except FileNotFoundError:  # committed meanwhile: its upload removes it
            return False

    return any(written_since(d) for d in (run_dir / ".checkpoint-staging").glob("step-*/rank-*"))


def _file_identity(path: Path) -> tuple[int, int, int] | None:
    """Changes with every append and with a rewrite (a new inode)."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    return info.st_ino, info.st_mtime_ns, info.st_size


def _resumed_from(output: str) -> int | None:
    match = re.search(r"resumed from step (\d+)", output)
    return int(match.group(1)) if match else None


def _check(report: CrashReport, attempt: int, record: dict, before: int | None, trained: bool,
           bad: list[tuple[int, str]]) -> None:
    """The verdicts after an attempt: every checkpoint with a manifest verifies; an attempt that trained resumed
    from the newest complete checkpoint there was when it started (one killed while resuming may not have said so
    yet, but if it did, it must be that one)."""
    resumed = record["resumed_from"]
    problems = []
    if bad:
        problems.append(f"a checkpoint with a manifest does not verify: {bad}")
    if (trained or resumed is not None) and resumed != before:
        problems.append(f"resumed from {resumed}, but the newest complete checkpoint was {before}")
    if problems:
        raise CrashVerdict(f"attempt {attempt} (kill aimed at {record['kind']}, in flight: {record.get('in_flight')}, "
                           f"store after: {record.get('store')}): {'; '.join(problems)}", report)


def final_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}
