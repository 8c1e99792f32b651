"""Render and submit a self-requeueing multi-node SLURM job that runs ``tarflow train`` under torchrun.

One srun task per node starts torchrun, which starts ``nproc_per_node`` trainer processes; the ranks meet through
torchrun's c10d rendezvous on the first node of the allocation. Preemption works in three hops:

    slurmctld ──USR1, signal_grace_s before the time limit──► batch shell (``--signal=B:USR1@S``)
    batch shell ──kill -USR1──► srun ──forwards──► torchrun ──TORCHELASTIC_SIGNALS_TO_HANDLE──► trainer ranks
    trainer: checkpoint at the next step boundary, write <run_dir>/preempted.json, exit PREEMPTION_EXIT_CODE

and the batch shell, seeing a preempted step (that exit code, or preempted.json, or a failure after USR1: torchrun
turns its ranks' codes into its own status 1), runs ``scontrol requeue`` while ``SLURM_RESTART_COUNT`` is below
``max_restarts``. A requeued attempt runs the same command; ``train.resume=auto`` picks up the newest checkpoint.
A normal finish or a real failure is not requeued, so a crash loop cannot spin.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .no_secrets import assert_no_secret_values
from .run_contract import PREEMPTED_FILE, PREEMPTION_EXIT_CODE, PREEMPTION_EXIT_CODE_ENV
from .torchrun import tarflow_program, torchrun_command

_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def time_limit_seconds(text: str) -> int:
    """SLURM's --time forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    m = _TIME.match(text.strip())
    if not m or text.strip() in ("", "0"):
        raise ValueError(f"time={text!r} is not a SLURM time limit (e.g. 30, 4:00:00, 1-12:00:00)")
    days, a, b, c = (int(g) if g is not None else None for g in m.groups())
    if days is not None:  # D-H[:M[:S]]
        return days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    if c is not None:     # H:M:S
        return a * 3600 + b * 60 + c
    if b is not None:     # M:S
        return a * 60 + b
    return a * 60         # M


@dataclass
class SlurmJob:
    run_dir: str                           # the run's outputs; the script and logs go to <run_dir>/slurm
    config: str | None = None              # YAML config path (None: the embedded default)
    overrides: list[str] = field(default_factory=list)
    nodes: int = 1
    gpus_per_node: int = 0
    nproc_per_node: int | None = None      # trainer processes per node; default gpus_per_node, or 1 on CPU
    cpus_per_task: int | None = None       # CPUs for each node's task (torchrun and all its ranks)
    time: str = "01:00:00"
    partition: str | None = None
    account: str | None = None
    signal_grace_s: int = 120              # USR1 this long before the time limit: time to finish a step and save
    max_restarts: int = 3                  # requeues after preemption; a real failure is never requeued
    job_name: str = "tarflow"
    extra_sbatch: list[str] = field(default_factory=list)  # more "#SBATCH ..." lines (e.g. "--qos=high")
    python: str = field(default_factory=lambda: sys.executable)  # shared filesystem: the submitter's interpreter
    workdir: str | None = None             # the job's working directory; default: where it was submitted from
    program: list[str] | None = None       # what torchrun runs; default: -m tarflow train CONFIG ...
    command: list[str] | None = None       # replaces torchrun entirely: the argv srun runs once per node
    preemption_exit_code: int = PREEMPTION_EXIT_CODE  # the trainer's preemption.exit_code, if configured otherwise

    def __post_init__(self) -> None:
        for name in ("nodes", "max_restarts", "signal_grace_s", "gpus_per_node"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (1 if name == "nodes" else 0):
                raise ValueError(f"{name}={value!r} must be an integer >= {1 if name == 'nodes' else 0}")
        if self.nproc_per_node is None:
            self.nproc_per_node = self.gpus_per_node or 1
        if self.nproc_per_node < 1:
            raise ValueError(f"nproc_per_node={self.nproc_per_node} must be >= 1")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise ValueError(f"cpus_per_task={self.cpus_per_task} must be >= 1")
        if not 1 <= self.preemption_exit_code <= 125:  # 126+ mean "not executable", "not found", signals
            raise ValueError(f"preemption_exit_code={self.preemption_exit_code} must be in 1..125")
        if not _NAME.match(self.job_name):
            raise ValueError(f"job_name={self.job_name!r}: use letters, digits, '.', '_' and '-'")
        if "://" in self.run_dir:  # the script and SLURM's logs go there; checkpoints may go to S3 separately
            raise ValueError(f"run_dir={self.run_dir!r} must be a directory (checkpoint.uri=s3://... puts the "
                             f"checkpoints on S3)")
        limit = time_limit_seconds(self.time)
        if self.signal_grace_s >= limit:
            raise ValueError(f"signal_grace_s={self.signal_grace_s} leaves no time to train within time={self.time}")
        for line in self.extra_sbatch:
            if "\n" in line or "\r" in line:
                raise ValueError(f"extra sbatch line {line!r} contains a newline")

    @property
    def slurm_dir(self) -> Path:
        return Path(self._abs(self.run_dir)) / "slurm"

    def _abs(self, path: str) -> str:
        return os.path.normpath(os.path.join(self.workdir or os.getcwd(), path))

    def trainer_argv(self) -> list[str]:
        """What torchrun runs. resume=auto and the run dir (absolute: the job's working directory may differ) come
        last, so that they win: every attempt continues the run."""
        if self.program is not None:
            return list(self.program)
        config = [self._abs(self.config)] if self.config else []
        overrides = [o for o in self.overrides if o.split("=", 1)[0].strip() != "train.run_dir"]  # given again last
        return tarflow_program("train", *config, *overrides, "train.resume=auto",
                               f"train.run_dir={self._abs(self.run_dir)}")


def _sbatch_line(option: str) -> str:
    option = option.strip()
    return option if option.startswith("#SBATCH") else f"#SBATCH {option}"


def render_sbatch(spec: SlurmJob, environ: dict[str, str] | None = None) -> str:
    q = shlex.quote
    slurm_dir = spec.slurm_dir
    workdir = spec.workdir or os.getcwd()
    for what, path in (("run_dir", str(slurm_dir)), ("workdir", workdir)):
        if any(ch.isspace() for ch in path):  # sbatch reads #SBATCH lines unquoted
            raise ValueError(f"{what} {path!r} contains whitespace, which #SBATCH --output/--chdir cannot take")
    head = [
        "#!/bin/bash",
        f"#SBATCH --job-name={spec.job_name}",
        f"#SBATCH --nodes={spec.nodes}",
        "#SBATCH --ntasks-per-node=1",  # one torchrun per node; torchrun starts the ranks
    ]
    if spec.gpus_per_node:
        head.append(f"#SBATCH --gpus-per-node={spec.gpus_per_node}")
    if spec.cpus_per_task:
        head.append(f"#SBATCH --cpus-per-task={spec.cpus_per_task}")
    head.append(f"#SBATCH --time={spec.time}")
    if spec.partition:
        head.append(f"#SBATCH --partition={spec.partition}")
    if spec.account:
        head.append(f"#SBATCH --account={spec.account}")
    head += [
        "#SBATCH --requeue",
        f"#SBATCH --signal=B:USR1@{spec.signal_grace_s}",
        "#SBATCH --open-mode=append",  # a requeued attempt (same job id) adds to the same logs
        f"#SBATCH --output={slurm_dir}/%j.out",
        f"#SBATCH --error={slurm_dir}/%j.err",
        f"#SBATCH --chdir={workdir}",
        *(_sbatch_line(line) for line in spec.extra_sbatch),
    ]

    if spec.command is not None:
        step = " ".join(q(a) for a in spec.command)
    else:
        # the options are shell expressions, expanded on each node; restarts are SLURM's job (requeue)
        python, *launcher = torchrun_command([], python=spec.python, nnodes='"$SLURM_NNODES"',
                                             nproc_per_node=spec.nproc_per_node,
                                             rdzv_endpoint='"$HEAD_NODE:$RDZV_PORT"', rdzv_id='"$SLURM_JOB_ID"')
        step = " ".join([q(python), *launcher, *(q(a) for a in spec.trainer_argv())])
    srun = "srun --ntasks-per-node=1 --kill-on-bad-exit=1"
    if spec.cpus_per_task:  # slurm 22.05's srun does not inherit --cpus-per-task from the allocation
        srun += f" --cpus-per-task={spec.cpus_per_task}"

    body = f"""
# Rendered by cluster.slurm. The job inherits the submitter's environment (sbatch's default --export=ALL):
# credentials such as AWS_* reach the trainer that way and are never written into this file.
set -uo pipefail  # not -e: the step's exit status decides what happens next

PREEMPTION_EXIT_CODE={spec.preemption_exit_code}
MAX_RESTARTS={spec.max_restarts}
RESTARTS=${{SLURM_RESTART_COUNT:-0}}
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# the same port on every node without talking: 10000-29999, below Linux's ephemeral range (cluster.env agrees)
RDZV_PORT=${{TARFLOW_RDZV_PORT:-$(( 10000 + SLURM_JOB_ID % 20000 ))}}
export {PREEMPTION_EXIT_CODE_ENV}=$PREEMPTION_EXIT_CODE
# torchrun passes these on to its ranks; USR1 is not among its defaults and would kill it outright
export TORCHELASTIC_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
# and waits this long for the ranks to checkpoint and exit before it kills them (its default is 30 s)
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT={spec.signal_grace_s}
mkdir -p {q(str(slurm_dir))}
# rank 0 writes this when the trainer stopped for preemption (torchrun's own status does not say so); one left by
# an earlier attempt must not speak for this one
PREEMPTED_FILE={q(str(slurm_dir.parent / PREEMPTED_FILE))}
rm -f "$PREEMPTED_FILE"
echo "[tarflow-slurm] $(date +%T) job $SLURM_JOB_ID attempt $(( RESTARTS + 1 )) on $SLURM_JOB_NODELIST, c10d $HEAD_NODE:$RDZV_PORT"

GOT_USR1=0
STEP_PID=
on_usr1() {{
  GOT_USR1=1
  echo "[tarflow-slurm] $(date +%T) USR1: the time limit is near, telling the trainer to checkpoint and stop"
  [ -n "$STEP_PID" ] && kill -USR1 "$STEP_PID" 2>/dev/null
}}
trap on_usr1 USR1

# bash runs a trap only between commands: a foreground srun would hold USR1 until the step ended. So srun runs
# in the background and the shell waits; a trapped signal ends `wait` early, hence the loop.
{srun} {step} &
STEP_PID=$!
while kill -0 "$STEP_PID" 2>/dev/null; do wait "$STEP_PID"; done
wait "$STEP_PID"; RC=$?  # bash keeps a finished child's status: this is the step's, not the signal's

# Preempted: the trainer's own code (srun passes on the highest task status), its preempted.json (a stop it chose
# itself, e.g. preemption.time_limit_minutes), or any failure after USR1 (torchrun reports a rank's exit as its own
# failure, status 1, so the code does not survive it).
PREEMPTED=0
if [ "$RC" -eq "$PREEMPTION_EXIT_CODE" ]; then PREEMPTED=1; fi
if [ "$RC" -ne 0 ] && [ -f "$PREEMPTED_FILE" ]; then PREEMPTED=1; echo "[tarflow-slurm] $(cat "$PREEMPTED_FILE")"; fi
if [ "$GOT_USR1" -eq 1 ] && [ "$RC" -ne 0 ]; then PREEMPTED=1; fi
echo "[tarflow-slurm] $(date +%T) step ended with status $RC"
if [ "$PREEMPTED" -eq 1 ]; then
  if [ "$RESTARTS" -lt "$MAX_RESTARTS" ]; then
    echo "[tarflow-slurm] preempted (status $RC): requeue $(( RESTARTS + 1 )) of $MAX_RESTARTS"
    scontrol requeue "$SLURM_JOB_ID" && exit 0
    echo "[tarflow-slurm] scontrol requeue failed" >&2
  else
    echo "[tarflow-slurm] preempted (status $RC) but $RESTARTS of $MAX_RESTARTS restarts are used: not requeued" >&2
  fi
elif [ "$RC" -ne 0 ]; then
  echo "[tarflow-slurm] step failed with status $RC: not requeued" >&2
fi
exit "$RC"
"""
    text = "\n".join(head) + "\n" + body
    assert_no_secret_values(text, os.environ if environ is None else environ, "sbatch script")
    return text


@dataclass(frozen=True)
class Submission:
    job_id: str | None        # None on a dry run
    script: Path
    stdout: Path              # %j resolved once the job id is known
    stderr: Path
    text: str


def submit(spec: SlurmJob, dry_run: bool = False) -> Submission:
    """Write <run_dir>/slurm/job.sbatch and ``sbatch --parsable`` it. A dry run renders only: no file, no job."""
    text = render_sbatch(spec)
    script = spec.slurm_dir / "job.sbatch"
    if dry_run:
        return Submission(None, script, spec.slurm_dir / "%j.out", spec.slurm_dir / "%j.err", text)
    if shutil.which("sbatch") is None:
        raise RuntimeError("sbatch not found: run this on a SLURM login node (or --dry-run to only render)")
    spec.slurm_dir.mkdir(parents=True, exist_ok=True)  # sbatch opens the log files there before the script runs
    script.write_text(text)
    done = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True,
                          cwd=spec.workdir or os.getcwd())
    if done.returncode != 0:
        raise RuntimeError(f"sbatch failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    job_id = done.stdout.strip().split(";")[0]  # --parsable prints "id" or "id;cluster"
    if not job_id.isdigit():
        raise RuntimeError(f"sbatch printed {done.stdout.strip()!r}, not a job id")
    return Submission(job_id, script, spec.slurm_dir / f"{job_id}.out", spec.slurm_dir / f"{job_id}.err", text)
