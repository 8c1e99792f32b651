"""cluster.slurm: the rendered sbatch script, and real jobs on the local slurmctld (cluster/local_slurm/up.sh).

The requeue-logic jobs are submitted together at the start of the module (they run side by side on the two slurmd
"nodes") and each test waits for its own. Their trainer is replaced by tiny programs through the spec's `program`
(what torchrun runs) and `command` (what srun runs instead of torchrun) fields; the batch script around them is the
one users get. The last tests run the real trainer: submitted with `tarflow launch slurm`, preempted, requeued and
compared step by step with an uninterrupted run; and as plain srun tasks without torchrun.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from cluster.env import slurm_master_port
from cluster.run_contract import PREEMPTION_EXIT_CODE
from cluster.slurm import SlurmJob, Submission, render_sbatch, submit, time_limit_seconds
from tarflow.main import main as launch_main
from tarflow_testing.checkpoint_helpers import model_state
from tarflow_testing.runs import TINY, torchrun

REPO = Path(__file__).resolve().parents[1]
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def _spec(tmp_path: Path, **kw) -> SlurmJob:
    defaults = dict(run_dir=str(tmp_path / "run"), config="configs/digits.yaml", overrides=["train.steps=20"],
                    nodes=2, gpus_per_node=4, time="2:00:00", signal_grace_s=90, workdir=str(REPO))
    return SlurmJob(**{**defaults, **kw})


# ---------------------------------------------------------------- rendering (no SLURM needed)

def test_rendered_script_is_valid_bash_with_requeue_signal_and_c10d(tmp_path):
    text = render_sbatch(_spec(tmp_path, partition="gpu", account="ml", cpus_per_task=16,
                               extra_sbatch=["--qos=high", "#SBATCH --exclusive"]))
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    subprocess.run(["bash", "-n", str(script)], check=True)
    for line in ("#SBATCH --requeue", "#SBATCH --signal=B:USR1@90", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --gpus-per-node=4", "#SBATCH --cpus-per-task=16", "#SBATCH --partition=gpu",
                 "#SBATCH --account=ml", "#SBATCH --qos=high", "#SBATCH --exclusive", "#SBATCH --time=2:00:00",
                 f"#SBATCH --output={tmp_path}/run/slurm/%j.out", f"#SBATCH --chdir={REPO}",
                 f"PREEMPTION_EXIT_CODE={PREEMPTION_EXIT_CODE}", "trap on_usr1 USR1",
                 f"PREEMPTED_FILE={tmp_path}/run/preempted.json", 'rm -f "$PREEMPTED_FILE"'):
        assert line in text.splitlines(), line
    step = next(line for line in text.splitlines() if line.startswith("srun "))
    assert step.endswith(" &")  # in the background, so that the USR1 trap runs while the step does
    for part in ("--cpus-per-task=16", "-m torch.distributed.run", '--nnodes="$SLURM_NNODES"', "--nproc_per_node=4",
                 "--rdzv_backend=c10d", '--rdzv_endpoint="$HEAD_NODE:$RDZV_PORT"', '--rdzv_id="$SLURM_JOB_ID"',
                 f"-m tarflow train {REPO}/configs/digits.yaml train.steps=20 train.resume=auto "
                 f"train.run_dir={tmp_path}/run"):
        assert part in step, part
    assert "scontrol requeue" in text and "SIGUSR1" in text  # torchrun must pass USR1 on


def test_no_secret_values_in_the_script(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")
    text = render_sbatch(_spec(tmp_path))
    assert SECRET not in text and "AKIAIOSFODNN7EXAMPLE" not in text and "AWS_" in text  # only the comment names it
    with pytest.raises(ValueError, match="AWS_SECRET_ACCESS_KEY") as err:  # a secret smuggled in an override
        render_sbatch(_spec(tmp_path, overrides=[f"data.key={SECRET}"]))
    assert SECRET not in str(err.value)


@pytest.mark.parametrize("text, seconds", [("30", 1800), ("1:30", 90), ("4:00:00", 14400), ("1-12", 129600),
                                           ("2-00:30", 174600), ("1-00:00:01", 86401)])
def test_time_limits(text, seconds):
    assert time_limit_seconds(text) == seconds


@pytest.mark.parametrize("kw, message", [
    ({"time": "soon"}, "not a SLURM time limit"), ({"time": "2", "signal_grace_s": 120}, "leaves no time"),
    ({"nodes": 0}, "nodes=0"), ({"job_name": "my job"}, "job_name"), ({"nproc_per_node": 0}, "nproc_per_node=0"),
    ({"extra_sbatch": ["--qos=a\nrm -rf /"]}, "newline"), ({"preemption_exit_code": 143}, "1..125"),
    ({"run_dir": "s3://bucket/run"}, "must be a directory"),
])
def test_bad_specs_are_refused(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        _spec(tmp_path, **kw)


def test_paths_with_whitespace_are_refused(tmp_path):
    with pytest.raises(ValueError, match="whitespace"):  # #SBATCH --output takes no quotes
        render_sbatch(_spec(tmp_path, run_dir=str(tmp_path / "my run")))


def test_cli_dry_run_prints_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    config = tmp_path / "c.yaml"
    config.write_text(f"train:\n  run_dir: {tmp_path}/from_yaml\n  steps: 5\n")
    assert launch_main(["launch", "slurm", str(config), "train.steps=7", "schedule.warmup_steps=1",
                        "train.strategy=ddp", "train.micro_batch=8", "--nodes", "2", "--gpus-per-node", "8",
                        "--time", "4:00:00", "--partition", "p", "--signal-grace", "300", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --signal=B:USR1@300" in out and "--nproc_per_node=8" in out
    assert (f"train.steps=7 schedule.warmup_steps=1 train.strategy=ddp train.micro_batch=8 train.resume=auto "
            f"train.run_dir={tmp_path}/from_yaml") in out  # run dir from the YAML
    assert not (tmp_path / "from_yaml").exists()
    assert launch_main(["launch", "slurm", "preemption.exit_code=99", "--dry-run"]) == 0
    assert "PREEMPTION_EXIT_CODE=99" in capsys.readouterr().out.splitlines()
    assert launch_main(["launch", "slurm", "--time", "1", "--dry-run"]) == 2  # grace 120 s > a 1-minute limit


@pytest.mark.parametrize("overrides, flags, message", [
    ([], ["--nodes", "2"], "train.strategy=single trains in one process, but the launch starts --nodes 2 × "
                           "--nproc-per-node 1 = 2 processes: set train.strategy to one of ['ddp', 'deepspeed', "
                           "'fsdp'], or launch --nodes 1 --nproc-per-node 1"),
    (["train.strategy=ddp", "train.micro_batch=32"], ["--nodes", "2", "--gpus-per-node", "4"],
     "train.global_batch: 128 is not divisible by train.micro_batch × data-parallel size = 32 × 8 = 256 (the launch "
     "starts --nodes 2 × --nproc-per-node 4 = 8 processes)"),
    (["train.strategy=fsdp", "train.global_batch=32", "train.micro_batch=8"], ["--nodes", "3"],
     "train.global_batch: 32 is not divisible by train.micro_batch × data-parallel size = 8 × 3 = 24 (the launch "
     "starts --nodes 3 × --nproc-per-node 1 = 3 processes)"),
    (["train.stepz=3"], [], "unknown config key 'train.stepz' (from command line); did you mean 'train.steps'?"),
])
@pytest.mark.parametrize("dry_run", [True, False])
def test_a_job_that_could_only_fail_at_start_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch,
                                                                                   overrides, flags, message, dry_run):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch: a submission that got this far would say so instead
    run_dir = tmp_path / "run"
    code = launch_main(["launch", "slurm", f"train.run_dir={run_dir}", *overrides, *flags,
                        *(["--dry-run"] if dry_run else [])])
    captured = capsys.readouterr()
    assert (code, captured.out, captured.err) == (2, "", f"tarflow launch: error: {message}\n")
    assert not run_dir.exists()


def test_a_valid_multi_node_job_renders(capsys):
    assert launch_main(["launch", "slurm", "train.strategy=ddp", "train.global_batch=128", "train.micro_batch=16",
                        "--nodes", "2", "--gpus-per-node", "4", "--dry-run"]) == 0
    assert "--nproc_per_node=4" in capsys.readouterr().out


# ---------------------------------------------------------------- a real slurmctld

PROBE = """
from cluster.env import discover
print("ENV", repr(discover()), flush=True)
"""

# attempt 1 waits for USR1 and exits with the preemption code, as the trainer does; the requeued attempt finishes
PREEMPTIBLE = """
import os, signal, sys, time
from cluster.env import discover
env = discover()
if env.restart_count >= 1:
    print(f"resumed rank {env.rank} restart {env.restart_count}", flush=True)
    sys.exit(0)
def stop(*_):
    print(f"rank {env.rank} got USR1", flush=True)
    sys.exit(int(os.environ["TARFLOW_PREEMPTION_EXIT_CODE"]))
signal.signal(signal.SIGUSR1, stop)
print(f"ready rank {env.rank}", flush=True)
time.sleep(120)
sys.exit(3)
"""

# the "trainer" of the requeue-logic jobs: srun runs it directly (no torchrun), so its exit code reaches the shell
ATTEMPT = 'echo "attempt ${SLURM_RESTART_COUNT:-0}"; '


def _scontrol(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def _log(sub) -> str:
    return "".join(p.read_text() for p in (sub.stdout, sub.stderr) if p.exists())


def _wait(sub, timeout: float = 150) -> dict[str, str]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        info = _scontrol(sub.job_id)
        if info.get("JobState") in TERMINAL:
            return info
        time.sleep(1)
    subprocess.run(["scancel", sub.job_id])
    pytest.fail(f"job {sub.job_id} did not finish in {timeout:.0f} s: {info}\n{_log(sub)}")


def _wait_for_text(sub, text: str, count: int, timeout: float = 90) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if _log(sub).count(text) >= count:
            return
        time.sleep(0.5)
    pytest.fail(f"job {sub.job_id}: {count}× {text!r} not seen in {timeout:.0f} s:\n{_log(sub)}")


@pytest.fixture(scope="module")
def slurm_up():
    if shutil.which("sinfo") is None:
        pytest.skip("sinfo not found: no SLURM here; bring one up with `bash cluster/local_slurm/up.sh` (as root)")
    state = subprocess.run(["sinfo", "-h", "-o", "%D %T"], capture_output=True, text=True)
    assert state.returncode == 0 and state.stdout.strip(), \
        f"SLURM is installed but not answering ({state.stderr.strip()}): run `bash cluster/local_slurm/up.sh`"
    nodes = sum(int(n) for n, s in (line.split() for line in state.stdout.splitlines()) if not s.startswith("down"))
    assert nodes >= 2, f"the 2-node tests need 2 nodes, sinfo says: {state.stdout}"


@pytest.fixture(scope="module")
def jobs(slurm_up, tmp_path_factory):
    """Submit every requeue-logic job at once; they run side by side (2 nodes × 4 CPU slots) in about 30 s."""
    base = tmp_path_factory.mktemp("slurm")
    probe, preemptible = base / "probe.py", base / "preemptible.py"
    probe.write_text(PROBE)
    preemptible.write_text(textwrap.dedent(PREEMPTIBLE))

    def go(name: str, **kw):
        kw = {"run_dir": str(base / name), "time": "3", "signal_grace_s": 30, "workdir": str(REPO),
              "job_name": f"test-{name}", "python": sys.executable, **kw}
        return submit(SlurmJob(**kw))

    return {
        "torchrun_2node": go("torchrun_2node", nodes=2, program=[str(probe)]),
        "srun_2node": go("srun_2node", nodes=2, command=[sys.executable, str(probe)]),
        "preempted_once": go("preempted_once", max_restarts=2, command=[
            "bash", "-c", ATTEMPT + f'[ "${{SLURM_RESTART_COUNT:-0}}" -ge 1 ] && exit 0; exit {PREEMPTION_EXIT_CODE}']),
        "real_failure": go("real_failure", max_restarts=2, command=["bash", "-c", ATTEMPT + "exit 1"]),
        "always_preempted": go("always_preempted", max_restarts=1,
                               command=["bash", "-c", ATTEMPT + f"exit {PREEMPTION_EXIT_CODE}"]),
        "usr1": go("usr1", program=[str(preemptible)]),
        # attempt 0 stops as the trainer does under torchrun (preempted.json, torchrun's status 1): requeued;
        # attempt 1 fails for real: the file attempt 0 left must not requeue it again
        "preempted_file": go("preempted_file", max_restarts=2, command=["bash", "-c", ATTEMPT + (
            f'[ "${{SLURM_RESTART_COUNT:-0}}" -ge 1 ] && exit 1; echo "{{}}" > {base}/preempted_file/preempted.json; '
            'exit 1')]),
        # `tarflow launch` refuses this config before submitting; the job's own handling is what is tested here
        "config_error": go("config_error", max_restarts=2, overrides=["train.strategy=nonsense"]),
    }


def _attempts(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith("attempt ")]


def _envs(log: str) -> list[str]:
    return sorted(line for line in log.splitlines() if line.startswith("ENV "))


def test_two_node_job_under_torchrun(jobs):
    sub = jobs["torchrun_2node"]
    info = _wait(sub)
    log = _log(sub)
    assert info["JobState"] == "COMPLETED", log
    assert sub.script.read_text() == sub.text and sub.stdout == sub.script.parent / f"{sub.job_id}.out"
    envs = _envs(log)
    assert len(envs) == 2, log
    for rank, line in enumerate(envs):
        assert f"rank={rank}, world_size=2," in line and f"node_rank={rank}," in line, line
        assert "num_nodes=2," in line and f"job_id='{sub.job_id}'" in line and "cluster='slurm'" in line, line
        assert "scheduler='torchrun'" in line
    masters = {re.search(r"master_addr='([^']*)', master_port=(\d+)", line).groups() for line in envs}
    assert len(masters) == 1, envs  # both ranks agree where rank 0 listens


def test_two_node_job_of_direct_srun_tasks(jobs):
    sub = jobs["srun_2node"]
    info = _wait(sub)
    log = _log(sub)
    assert info["JobState"] == "COMPLETED", log
    envs = _envs(log)
    assert len(envs) == 2, log
    port = slurm_master_port(sub.job_id)
    for rank, line in enumerate(envs):
        assert f"rank={rank}, world_size=2, local_rank=0, local_world_size=1, node_rank={rank}," in line, line
        assert f"master_addr='node1', master_port={port}," in line and "scheduler='slurm'" in line, line


def test_preempted_job_is_requeued_and_then_finishes(jobs):
    sub = jobs["preempted_once"]
    info = _wait(sub)
    log = _log(sub)
    assert (info["JobState"], info["Restarts"], info["ExitCode"]) == ("COMPLETED", "1", "0:0"), log
    assert _attempts(log) == ["attempt 0", "attempt 1"] and "requeue 1 of 2" in log


def test_real_failure_is_not_requeued(jobs):
    sub = jobs["real_failure"]
    info = _wait(sub)
    log = _log(sub)
    assert (info["JobState"], info["Restarts"], info["ExitCode"]) == ("FAILED", "0", "1:0"), log
    assert "step failed with status 1: not requeued" in log and _attempts(log) == ["attempt 0"]


def test_requeues_stop_after_max_restarts(jobs):
    sub = jobs["always_preempted"]
    info = _wait(sub)
    log = _log(sub)
    assert (info["JobState"], info["Restarts"], info["ExitCode"]) == ("FAILED", "1", f"{PREEMPTION_EXIT_CODE}:0"), log
    assert _attempts(log) == ["attempt 0", "attempt 1"], log
    assert "1 of 1 restarts are used: not requeued" in log


def test_preempted_json_requeues_a_failed_step_once(jobs):
    sub = jobs["preempted_file"]
    info = _wait(sub)
    log = _log(sub)
    assert (info["JobState"], info["Restarts"], info["ExitCode"]) == ("FAILED", "1", "1:0"), log
    assert _attempts(log) == ["attempt 0", "attempt 1"] and "requeue 1 of 2" in log, log
    assert "step failed with status 1: not requeued" in log


def test_usr1_reaches_the_ranks_through_srun_and_torchrun_and_the_job_requeues(jobs):
    """What `--signal=B:USR1@S` does near the time limit, sent now (the scheduler's own timer is ~30 s coarse)."""
    sub = jobs["usr1"]
    _wait_for_text(sub, "ready rank 0", 1)
    subprocess.run(["scancel", "--batch", "--signal=USR1", sub.job_id], check=True)
    info = _wait(sub)
    log = _log(sub)
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "1"), log
    assert "rank 0 got USR1" in log and "resumed rank 0 restart 1" in log, log


def test_a_trainer_config_error_fails_the_job_without_requeue(jobs):
    sub = jobs["config_error"]
    info = _wait(sub)
    log = _log(sub)
    assert (info["JobState"], info["Restarts"]) == ("FAILED", "0"), log
    assert "train.strategy: must be one of" in log and "not requeued" in log, log


# ---------------------------------------------------------------- the real trainer

CPU_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # sbatch passes the submitter's environment on to the job


def launch(run_dir: Path, *options: str, overrides: tuple[str, ...] = ()) -> Submission:
    """``tarflow launch slurm`` as a user types it; the job runs the tiny digits model on CPU."""
    done = subprocess.run([sys.executable, "-m", "tarflow", "launch", "slurm", *options, "--time", "5",
                           "--signal-grace", "60", "--job-name", f"test-{run_dir.name}", *overrides,
                           f"train.run_dir={run_dir}"], cwd=REPO, env=CPU_ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    m = re.search(r"^submitted job (\d+): (\S+)$", done.stdout, re.M)
    assert m and f"logs: {run_dir}/slurm/{m.group(1)}.out" in done.stdout, done.stdout
    slurm = run_dir / "slurm"
    return Submission(m.group(1), Path(m.group(2)), slurm / f"{m.group(1)}.out", slurm / f"{m.group(1)}.err", "")


def _losses(run_dir: Path) -> dict[int, list[float]]:
    """train/loss of every logged step, as a list: a step logged twice would show up twice. (A resumed run drops
    the records past its checkpoint; that it resumed exactly where it stopped is asserted from the job's log.)"""
    out: dict[int, list[float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "train/loss" in record:
            out.setdefault(record["step"], []).append(record["train/loss"])
    return out


def _steps_logged(run_dir: Path) -> int:
    """While the run writes: the last step with a complete record."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.exists() else []  # the last one may be half written
    return max((json.loads(line)["step"] for line in lines if "train/loss" in line), default=0)


def _assert_same_model(a: Path, b: Path) -> None:
    sa, sb = model_state(a), model_state(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


STEPS = 80
RUN = (*TINY, "train.strategy=ddp", "logging.every=1", f"train.steps={STEPS}", "checkpoint.every=40",
       "eval.at_start=false")


def test_two_node_training_preempted_by_usr1_is_requeued_and_matches_an_uninterrupted_run(slurm_up, tmp_path):
    """2 nodes × 1 rank under torchrun; USR1 as `--signal=B:USR1@S` sends it, after a few steps; the requeued
    attempt resumes (train.resume=auto) and finishes. Every step's loss and the final model equal those of an
    uninterrupted 2-rank run: nothing trained twice, nothing skipped (CPU fp32 resumes bitwise)."""
    run_dir, straight = tmp_path / "preempted", tmp_path / "straight"
    sub = launch(run_dir, "--nodes", "2", "--max-restarts", "2", overrides=RUN)
    with ThreadPoolExecutor(1) as pool:  # the uninterrupted run, meanwhile
        uninterrupted = pool.submit(torchrun, ["-m", "tarflow", "train", f"train.run_dir={straight}", *RUN])
        end = time.monotonic() + 90
        while _steps_logged(run_dir) < 5:
            assert _scontrol(sub.job_id)["JobState"] in ("PENDING", "RUNNING"), _log(sub)
            assert time.monotonic() < end, f"no 5 steps in 90 s:\n{_log(sub)}"
            time.sleep(0.1)
        subprocess.run(["scancel", "--batch", "--signal=USR1", sub.job_id], check=True)
        signalled = time.monotonic()
        while not (run_dir / "preempted.json").exists():
            assert time.monotonic() < signalled + 60, f"no preempted.json 60 s after USR1:\n{_log(sub)}"
            time.sleep(0.05)
        saved = time.monotonic() - signalled
        preempted = json.loads((run_dir / "preempted.json").read_text())
        info = _wait(sub, timeout=180)
        uninterrupted.result()
    log = _log(sub)
    assert (info["JobState"], info["Restarts"], info["ExitCode"]) == ("COMPLETED", "1", "0:0"), log
    assert re.findall(r"attempt (\d+) on node\[1-2\]", log) == ["1", "2"], log  # from SLURM_RESTART_COUNT
    stop = preempted["step"]
    assert preempted["reason"] == "SIGUSR1" and 5 <= stop < STEPS and preempted["exit_code"] == PREEMPTION_EXIT_CODE
    assert f"stopping at step {stop}: SIGUSR1" in log and f"resumed from step {stop} " in log, log
    assert "requeue 1 of 2" in log and f"done: step {STEPS}" in log, log
    # the resumed job's metrics hold every step once, with the uninterrupted run's losses
    ours, theirs = _losses(run_dir), _losses(straight)
    assert sorted(ours) == list(range(1, STEPS + 1)) and all(len(v) == 1 for v in ours.values())
    assert ours == theirs
    _assert_same_model(run_dir / "checkpoints" / f"step-{STEPS:08d}", straight / "checkpoints" / f"step-{STEPS:08d}")
    ended, started = (re.search(rf"\[tarflow-slurm\] (\d+):(\d+):(\d+) {what}", log) for what in
                      ("step ended", r"job \d+ attempt 2"))
    seconds = [int(h) * 3600 + int(m) * 60 + int(s) for h, m, s in (ended.groups(), started.groups())]
    print(f"USR1 → checkpoint saved and preempted.json: {saved:.1f} s; step end → requeued attempt started: "
          f"{(seconds[1] - seconds[0]) % 86400} s")


@pytest.fixture(scope="module")
def mds_digits(tmp_path_factory):
    from data_pipeline.sources import open_source
    from data_pipeline.writer import write_dataset

    root = tmp_path_factory.mktemp("mds")
    write_dataset(open_source("digits"), str(root), "mds", shard_size=30_000)
    return root


@pytest.mark.streaming  # see tests/conftest.py
def test_plain_srun_tasks_train_like_torchrun_ranks_on_mds_shards(slurm_up, mds_digits, tmp_path):
    """`srun -n 2 python -m tarflow train`: no torchrun, so the ranks come from SLURM's variables, the
    rendezvous is tcp:// to the first node, and streaming gets torchrun's variables from cluster.env (both ranks on
    one node share its cache). Bitwise the same as torchrun's two ranks."""
    run = [*TINY, "train.strategy=ddp", "train.steps=4", "eval.at_start=false", "eval.every=0", "data.format=mds",
           f"data.uri={mds_digits}"]
    srun = subprocess.Popen(["srun", "--nodes=1", "--ntasks=2", "--time=3", "--job-name=test-plain-srun",
                             "--kill-on-bad-exit=1", sys.executable, "-m", "tarflow", "train", *run,
                             f"train.run_dir={tmp_path / 'srun'}"], cwd=REPO, env=CPU_ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    torchrun(["-m", "tarflow", "train", *run, f"train.run_dir={tmp_path / 'torchrun'}"])
    out = srun.communicate(timeout=180)[0]
    assert srun.returncode == 0, out
    assert "done: step 4" in out, out
    _assert_same_model(tmp_path / "srun" / "checkpoints" / "step-00000004",
                       tmp_path / "torchrun" / "checkpoints" / "step-00000004")
