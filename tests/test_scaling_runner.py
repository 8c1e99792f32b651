"""The study's backends (scaling.local, scaling.slurm, scaling.k8s): skipping finished points, resuming interrupted
ones, retrying and reporting failed ones; the state file; results; the SLURM job array (its task wrapper and
bookkeeping, scaling.reconcile) and the Kubernetes jobs.

The trainer here is a stand-in with the real one's contract (argv, run dir, summary.json, the preemption exit code,
resume from its "checkpoint"), so that these tests run in seconds; tests/test_scaling_cli.py runs the real one.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest

from scaling import array_task, reconcile
from scaling.collect import collect_results
from scaling.k8s import k8s_job_name, submit_k8s
from scaling.local import run_local
from scaling.plan import plan_study
from scaling.results import read_csv, write_csv
from scaling.rundir import ATTEMPTS_FILE, LOG_FILE, error_line, read_attempts
from scaling.slurm import submit_slurm
from scaling.spec import StudyError
from scaling.state import STATE_FILE, StudyState, study_lock
from scaling.validate import study_from_dict

REPO = Path(__file__).resolve().parents[1]

FAKE_TRAINER = r'''
import json, math, os, sys
from pathlib import Path

kv = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
run_dir, steps = Path(kv["train.run_dir"]), int(kv["train.steps"])
run_dir.mkdir(parents=True, exist_ok=True)
with open(os.environ["FAKE_LAUNCHES"], "a") as f:
    f.write(run_dir.name + "\n")
ckpt = run_dir / "checkpoint"
start = int(ckpt.read_text()) if ckpt.exists() else 0
if start:
    print(f"resumed from step {start}")
fail = os.environ.get("FAKE_FAIL", "")        # "<part of the point name>:<times>"
if fail and fail.split(":")[0] in run_dir.name:
    count = run_dir / "failures"
    n = int(count.read_text()) if count.exists() else 0
    if n < int(fail.split(":")[1]):
        count.write_text(str(n + 1))
        print("Traceback (most recent call last):\n  File \"loop.py\", line 1\nRuntimeError: injected failure", n + 1)
        sys.exit(1)
stop = os.environ.get("FAKE_STOP", "")        # "<part of the point name>:<step>": preempted there once
if stop and stop.split(":")[0] in run_dir.name and not start:
    at = int(stop.split(":")[1])
    ckpt.write_text(str(at))
    (run_dir / "summary.json").write_text(json.dumps({"step": at, "final_bits_per_dim": None, "preempted": "SIGTERM",
                                                      "seconds": 0.01}))
    print(f"stopping at step {at}: SIGTERM")
    sys.exit(75)
ckpt.write_text(str(steps))
bpd = 2.0 + 40.0 * float(kv["model.channels"]) ** -0.5
(run_dir / "summary.json").write_text(json.dumps({"step": steps, "final_bits_per_dim": bpd, "preempted": None,
                                                  "seconds": 0.02}))
print(f"done: step {steps}")
'''


@pytest.fixture
def fake(tmp_path, monkeypatch):
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    launches = tmp_path / "launches.log"
    launches.touch()
    monkeypatch.setenv("FAKE_LAUNCHES", str(launches))
    return [sys.executable, str(script)], launches


def _study(tmp_path, sizes=(16, 32, 64), **kw):
    spec = study_from_dict({"name": "t", "config": str(REPO / "configs" / "digits.yaml"),
                            "sizes": {"channels": list(sizes), "head_dim": 16}, "budgets": [{"steps": 20}],
                            "warmup_fraction": 0.1, **kw})
    directory = tmp_path / "study"
    return spec, directory, plan_study(spec, directory)


def _run(points, directory, command, max_retries=1, **kw):
    state = StudyState.load(directory)
    logs = []
    summary = run_local(points, state, max_retries=max_retries, command=command, log=logs.append, **kw)
    return summary, StudyState.load(directory), logs


def _run_injected(tmp_path, fake, monkeypatch, max_retries: int, **env):
    """The study of ``_study`` run once with the fake trainer's FAKE_* injections set."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    _, directory, points = _study(tmp_path)
    return (*_run(points, directory, fake[0], max_retries=max_retries), points, directory)


def _launches(path: Path) -> list[str]:
    return path.read_text().split()


def test_every_point_runs_once_and_a_second_run_launches_nothing(tmp_path, fake):
    command, launches = fake
    spec, directory, points = _study(tmp_path)
    summary, state, _ = _run(points, directory, command)
    assert summary.launched == [p.name for p in points] and not summary.failed
    assert all(state[p.name].status == "ok" and state[p.name].attempts == 1 for p in points)
    mtimes = {p.name: (Path(p.run_dir) / "summary.json").stat().st_mtime_ns for p in points}
    before = (directory / STATE_FILE).read_text()

    summary, state, logs = _run(points, directory, command)
    assert summary.launched == [] and summary.skipped == [p.name for p in points]
    assert _launches(launches) == [p.name for p in points]  # nothing ran the second time
    assert {p.name: (Path(p.run_dir) / "summary.json").stat().st_mtime_ns for p in points} == mtimes
    assert [state[p.name].attempts for p in points] == [1, 1, 1]
    assert json.loads((directory / STATE_FILE).read_text())["points"] == json.loads(before)["points"]

    results = collect_results(points, state)
    assert [r.status for r in results] == ["ok"] * 3
    assert [r.bits_per_dim for r in results] == sorted((r.bits_per_dim for r in results), reverse=True)
    p = points[0]
    assert results[0].train_flops == p.flops_per_image * 20 * p.global_batch and results[0].images_seen == 20 * 128
    assert results[0].params_no_embed < results[0].params_total
    write_csv(results, tmp_path / "results.csv")
    assert read_csv(tmp_path / "results.csv") == results


def test_an_interrupted_point_is_resumed_and_only_it_runs(tmp_path, fake):
    command, launches = fake
    _, directory, points = _study(tmp_path)
    _run(points, directory, command)
    # the middle point was killed after its checkpoint at step 5: no final summary
    middle = Path(points[1].run_dir)
    (middle / "summary.json").unlink()
    (middle / "checkpoint").write_text("5")
    summary, state, _ = _run(points, directory, command)
    assert summary.launched == [points[1].name] and len(summary.skipped) == 2
    assert _launches(launches)[3:] == [points[1].name]
    assert "resumed from step 5" in (middle / LOG_FILE).read_text()
    assert state[points[1].name].attempts == 2 and state[points[1].name].status == "ok"


def test_a_preempted_attempt_is_resumed_at_once_and_is_not_a_failure(tmp_path, fake, monkeypatch):
    summary, state, logs, points, _ = _run_injected(tmp_path, fake, monkeypatch, 0, FAKE_STOP="c32:7")
    st = state[points[1].name]
    assert st.status == "ok" and st.attempts == 2 and st.failures == 0
    assert [h["outcome"] for h in st.history] == ["preempted", "ok"]
    assert any("stopped at step 7 (exit 75): resuming" in line for line in logs)


def test_a_transient_failure_is_retried_and_the_retry_resumes(tmp_path, fake, monkeypatch):
    summary, state, logs, points, _ = _run_injected(tmp_path, fake, monkeypatch, 1, FAKE_FAIL="c16:1")
    st = state[points[0].name]
    assert st.status == "ok" and st.attempts == 2 and st.failures == 1 and not summary.failed
    assert [h["returncode"] for h in st.history] == [1, 0]
    assert any("failed (exit 1): RuntimeError: injected failure 1; retry 1 of 1" in line for line in logs)


def test_a_failing_point_is_retried_up_to_the_count_then_reported_and_the_others_finish(tmp_path, fake, monkeypatch):
    command, launches = fake
    summary, state, logs, points, directory = _run_injected(tmp_path, fake, monkeypatch, 2, FAKE_FAIL="c32:99")
    bad = points[1].name
    assert summary.failed == [bad] and len(summary.launched) == 3
    st = state[bad]
    assert (st.status, st.attempts, st.failures) == ("failed", 3, 3)
    assert st.error == "exit 1: RuntimeError: injected failure 3" and "Traceback" in st.error_tail
    assert [state[p.name].status for p in points] == ["ok", "failed", "ok"]
    results = collect_results(points, state)
    failed = [r for r in results if r.status == "failed"]
    assert len(failed) == 1 and failed[0].bits_per_dim is None and failed[0].attempts == 3
    assert "injected failure" in failed[0].error

    # the next run of the study reports it again without running it; --retry-failed runs it again
    n = len(_launches(launches))
    summary, state, logs = _run(points, directory, command, max_retries=2)
    assert summary.launched == [] and summary.failed == [bad] and len(_launches(launches)) == n
    assert any("retries used up" in line for line in logs)
    monkeypatch.setenv("FAKE_FAIL", "")
    summary, state, _ = _run(points, directory, command, max_retries=2, retry_failed=True)
    assert summary.launched == [bad] and state[bad].status == "ok" and state[bad].attempts == 4


def test_a_point_whose_config_is_invalid_is_reported_without_running(tmp_path, fake):
    command, launches = fake
    spec = study_from_dict({"name": "t", "config": str(REPO / "configs" / "digits.yaml"),
                            "sizes": [{"name": "good", "channels": 32, "head_dim": 16},
                                      {"name": "odd", "channels": 40, "head_dim": 16}], "budgets": [{"steps": 5}],
                            "warmup_fraction": 0.1})
    points = plan_study(spec, tmp_path / "study")
    summary, state, logs = _run(points, tmp_path / "study", command)
    assert summary.launched == ["good-steps5-s0"] and summary.failed == ["odd-steps5-s0"]
    assert _launches(launches) == ["good-steps5-s0"]
    result = {r.name: r for r in collect_results(points, state)}["odd-steps5-s0"]
    assert result.status == "failed" and "not a multiple of head_dim" in result.error and result.attempts == 0


def test_only_one_driver_per_study_directory(tmp_path):
    with study_lock(tmp_path):
        with pytest.raises(StudyError, match="another `tarflow scale run` is driving"):
            with study_lock(tmp_path):
                pass
    with study_lock(tmp_path):  # released
        pass


def test_error_line_prefers_the_trainers_error_then_the_exception():
    assert error_line("x\ntarflow train: error: train.steps: must be >= 1\n") == \
        "tarflow train: error: train.steps: must be >= 1"
    assert error_line("Traceback\n  File x\nValueError: bad\n\n") == "ValueError: bad"
    assert error_line("") == "no output"


# ---------------------------------------------------------------- SLURM: the job array

def test_the_slurm_array_runs_the_points_through_the_shared_batch_script(tmp_path):
    spec, directory, points = _study(tmp_path, run={"where": "slurm", "slurm": {"max_parallel": 2,
                                                                                  "partition": "debug"}})
    state = StudyState.load(directory)
    result = submit_slurm(points, state, spec, directory, max_retries=1, dry_run=True, log=lambda m: None)
    script = result["script"]
    assert "#SBATCH --array=0-2%2" in script and "#SBATCH --partition=debug" in script
    assert "#SBATCH --requeue" in script and "scontrol requeue" in script
    assert f"{sys.executable} -m scaling.array_task {directory}/slurm/array-000.json" in script
    assert [e["name"] for e in result["array"]] == [p.name for p in points]
    assert result["array"][1]["argv"] == points[1].argv


def test_an_array_task_runs_its_point_records_the_attempt_and_reports_preemption(tmp_path, fake, monkeypatch):
    command, launches = fake
    _, directory, points = _study(tmp_path)
    array = tmp_path / "array.json"
    array.write_text(json.dumps({"points": [{"name": p.name, "run_dir": p.run_dir, "argv": p.argv}
                                            for p in points]}))
    monkeypatch.setattr(array_task, "child_argv", lambda entry, environ: [*command, *entry["argv"]])
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "2", "SLURM_JOB_ID": "1002", "SLURM_ARRAY_JOB_ID": "1000"}
    handlers = {sig: signal.getsignal(sig) for sig in array_task.FORWARDED}
    assert array_task.run(str(array), environ=env) == 0
    assert {sig: signal.getsignal(sig) for sig in array_task.FORWARDED} == handlers  # the caller's, restored
    assert _launches(launches) == [points[2].name]
    record, = read_attempts(points[2].run_dir)
    assert (record["returncode"], record["job"], record["array_job"], record["task"]) == (0, "1002", "1000", 2)

    # a trainer under torchrun that stopped for preemption exits 1 but leaves preempted.json: the task exits 75
    monkeypatch.setattr(array_task, "child_argv", lambda entry, environ: [
        sys.executable, "-c", f"import pathlib, sys; pathlib.Path({entry['run_dir']!r}, 'preempted.json')"
                              f".write_text('{{}}'); sys.exit(1)"])
    assert array_task.run(str(array), task=0, environ=env) == 75
    # and a real failure keeps its status and its output's tail
    monkeypatch.setattr(array_task, "child_argv", lambda entry, environ: [
        sys.executable, "-c", "import sys; print('ValueError: boom'); sys.exit(3)"])
    assert array_task.run(str(array), task=0, environ=env) == 3
    first = read_attempts(points[0].run_dir)
    assert [r["returncode"] for r in first] == [75, 3] and "ValueError: boom" in first[1]["tail"]

    # the driver merges the records: the preempted attempt is not a failure, the failed one is
    state = StudyState.load(directory)
    reconcile.merge_cluster_attempts(points[0], state[points[0].name])
    st = state[points[0].name]
    assert (st.attempts, st.failures, st.error) == (2, 1, "exit 3: ValueError: boom")
    reconcile.merge_cluster_attempts(points[0], st)  # merged once only
    assert st.attempts == 2


def test_the_driver_resubmits_ended_unfinished_tasks_within_the_retries(tmp_path, fake, monkeypatch):
    spec, directory, points = _study(tmp_path, run={"where": "slurm"})
    state = StudyState.load(directory)
    for i, p in enumerate(points):
        state[p.name].job = {"kind": "slurm", "id": "77", "task": i, "records_before": 0}
        state[p.name].status = "submitted"
    # task 0 still queued (its trainer has written the final summary, its wrapper not yet the attempt record);
    # task 1 ended without running; task 2 failed twice (its records)
    monkeypatch.setattr(reconcile, "_slurm_in_flight", lambda ids: {"77": {0}})
    Path(points[0].run_dir).mkdir(parents=True)
    (Path(points[0].run_dir) / "summary.json").write_text(json.dumps(
        {"step": 20, "final_bits_per_dim": 3.0, "preempted": None}))
    Path(points[2].run_dir).mkdir(parents=True)
    with open(Path(points[2].run_dir) / ATTEMPTS_FILE, "w") as f:
        for _ in range(2):
            f.write(json.dumps({"returncode": 1, "seconds": 1.5, "tail": "RuntimeError: x"}) + "\n")
    in_flight = reconcile.reconcile_cluster(points, state, max_retries=1, log=lambda m: None)
    assert in_flight == [points[0].name] and state[points[0].name].status == "submitted"
    assert (state[points[1].name].status, state[points[1].name].failures) == ("interrupted", 1)
    assert "ended without running the point" in state[points[1].name].error
    st = state[points[2].name]
    assert (st.status, st.failures, st.attempts, st.wall_seconds) == ("failed", 2, 2, 3.0)
    todo = reconcile.to_submit(points, state, set(in_flight), 1, False, "", lambda m: None)
    assert [p.name for p in todo] == [points[1].name]
    # once the task has left the queue, the finished point is done
    monkeypatch.setattr(reconcile, "_slurm_in_flight", lambda ids: {"77": set()})
    assert reconcile.reconcile_cluster(points, state, max_retries=1, log=lambda m: None) == []
    assert state[points[0].name].status == "ok" and state[points[0].name].job == {}


# ---------------------------------------------------------------- Kubernetes: one job per point

def test_kubernetes_gets_one_job_per_unfinished_point(tmp_path):
    spec, directory, points = _study(tmp_path, run={"where": "k8s", "k8s": {
        "image": "registry.example/tarflow:1", "run_root": "/shared/study", "checkpoint_prefix": "s3://b/study/"}})
    state = StudyState.load(directory)
    out = submit_k8s(points, state, spec, directory, spec.config, log=lambda m: None)
    assert len(out["manifests"]) == 3 and out["submitted"] == []
    import yaml

    docs = list(yaml.safe_load_all(Path(out["manifests"][1]).read_text()))
    kinds = [d["kind"] for d in docs]
    assert kinds == ["ConfigMap", "Service", "Job"]
    job = docs[-1]
    name = job["metadata"]["name"]
    assert len(name) <= 40 and name == k8s_job_name("t", points[1].name)
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert "model.channels=32" in command and "train.steps=20" in command and "train.noise=uniform" in command
    assert command[-3:] == ["train.resume=auto", f"train.run_dir=/shared/study/points/{points[1].name}",
                            f"checkpoint.uri=s3://b/study/{points[1].name}"]
    assert len({k8s_job_name("t", p.name) for p in points}) == 3


SLOW_TRAINER = r'''
import json, os, signal, sys, time
from pathlib import Path

kv = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
run_dir, steps = Path(kv["train.run_dir"]), int(kv["train.steps"])
run_dir.mkdir(parents=True, exist_ok=True)

def stop(signum, frame):  # the trainer's contract: checkpoint, write a preempted summary, exit 75
    (run_dir / "summary.json").write_text(json.dumps({"step": 3, "final_bits_per_dim": None, "preempted": "SIGTERM"}))
    sys.exit(75)

signal.signal(signal.SIGTERM, stop)
(run_dir / "started").touch()
time.sleep(60)
'''

DRIVER = r'''
import json, sys
from scaling.local import run_local
from scaling.plan import plan_study
from scaling.state import StudyState
from scaling.validate import study_from_dict

spec, directory, command = json.loads(sys.argv[1])
points = plan_study(study_from_dict(spec), directory)
out = run_local(points, StudyState.load(directory), max_retries=1, command=command)
print("RESULT", json.dumps(out.__dict__), flush=True)
'''


def test_ctrl_c_asks_the_running_point_to_checkpoint_and_stops_the_study(tmp_path):
    """SIGINT to the driver (Ctrl-C; the point runs in its own session, so only the driver gets it) becomes SIGTERM
    to the point, which checkpoints and exits 75: recorded as interrupted (not a failure), no further point runs."""
    import signal
    import subprocess
    import time

    trainer = tmp_path / "slow.py"
    trainer.write_text(SLOW_TRAINER)
    spec = {"name": "t", "config": str(REPO / "configs" / "digits.yaml"), "warmup_fraction": 0.1,
            "sizes": {"channels": [16, 32], "head_dim": 16}, "budgets": [{"steps": 20}]}
    directory = tmp_path / "study"
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps([spec, str(directory),
                                                                         [sys.executable, str(trainer)]])],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = directory / "points" / "c16-steps20-s0"
    deadline = time.monotonic() + 60
    while not (first / "started").exists():
        assert driver.poll() is None and time.monotonic() < deadline, driver.stdout.read()
        time.sleep(0.05)
    driver.send_signal(signal.SIGINT)
    out = driver.communicate(timeout=60)[0]
    assert driver.returncode == 0, out
    result = json.loads(out.split("RESULT ", 1)[1])
    assert result["interrupted"] and result["launched"] == ["c16-steps20-s0"] and not result["failed"]
    state = StudyState.load(directory)
    st = state["c16-steps20-s0"]
    assert (st.status, st.attempts, st.failures) == ("interrupted", 1, 0)
    assert st.history[0]["returncode"] == 75 and st.history[0]["outcome"] == "interrupted"
    assert not (directory / "points" / "c32-steps20-s0").exists()


def test_a_point_says_which_weights_its_results_are_of_and_its_fid_samples_the_same(tmp_path, fake):
    """A run with train.ema reports the weight average's bits/dim (summary.json "weights"); the study's row says so,
    and the point's `tarflow eval` is asked for the same weights. Runs from before EMA record none: no flag."""
    from scaling.fid_eval import FidPlan, fid_argv
    from scaling.spec import FidSpec

    command, _ = fake
    _, directory, points = _study(tmp_path)
    _, state, _ = _run(points, directory, command)
    summary_file = Path(points[0].run_dir) / "summary.json"
    summary = json.loads(summary_file.read_text())
    summary_file.write_text(json.dumps({**summary, "checkpoint": "/ck/step-00000020", "weights": "ema"}))
    results = collect_results(points, state)
    assert [r.weights for r in results] == ["ema", "raw", "raw"]
    write_csv(results, tmp_path / "results.csv")
    assert read_csv(tmp_path / "results.csv") == results
    plan = FidPlan(FidSpec(metric="quality"), inception="", network="", ref_stats="", command=["tarflow", "eval"])
    argv = fid_argv(plan, points[0])
    assert argv[:3] == ["tarflow", "eval", "/ck/step-00000020"] and argv[argv.index("--weights") + 1] == "ema"
    (Path(points[1].run_dir) / "summary.json").write_text(json.dumps({**summary, "checkpoint": "/ck/b"}))
    assert "--weights" not in fid_argv(plan, points[1])
