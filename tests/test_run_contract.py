"""cluster.run_contract and cluster.torchrun: the run contract and the launch command lines, defined once and used by
every launcher (SLURM, Kubernetes, the scaling driver's array task and local runner)."""

from __future__ import annotations

import json
import sys

from cluster import k8s, run_contract, slurm
from cluster.torchrun import TARFLOW_MODULE, tarflow_command, tarflow_program, torchrun_command, torchrun_options
from scaling import array_task
from scaling.local import trainer_command
from trainer.config import PreemptionConfig


def test_the_trainer_default_exit_code_is_the_contracts():
    assert PreemptionConfig().exit_code == run_contract.PREEMPTION_EXIT_CODE == slurm.PREEMPTION_EXIT_CODE == 75


def test_summary_and_preempted_files_are_read_or_none(tmp_path):
    assert run_contract.read_summary(tmp_path) is None and run_contract.read_preempted(tmp_path) is None
    (tmp_path / run_contract.SUMMARY_FILE).write_text(json.dumps({"step": 3}))
    (tmp_path / run_contract.PREEMPTED_FILE).write_text("not json")
    assert run_contract.read_summary(tmp_path) == {"step": 3} and run_contract.read_preempted(tmp_path) is None
    assert run_contract.preempted_path(tmp_path).name == "preempted.json"


def test_one_torchrun_command_line():
    opts = torchrun_options(nnodes=2, nproc_per_node=4, rdzv_endpoint="h:1", rdzv_id="j")
    assert opts == ["--nnodes=2", "--nproc_per_node=4", "--rdzv_backend=c10d", "--rdzv_endpoint=h:1", "--rdzv_id=j",
                    "--max_restarts=0"]
    assert torchrun_command(["-m", "x"], python="py", nnodes=2, nproc_per_node=4, rdzv_endpoint="h:1",
                            rdzv_id="j") == ["py", "-m", "torch.distributed.run", *opts, "-m", "x"]
    assert tarflow_program("train", "a=1") == ["-m", TARFLOW_MODULE, "train", "a=1"]
    assert tarflow_command("eval") == [sys.executable, "-m", TARFLOW_MODULE, "eval"] == [*trainer_command()[:2],
                                                                                          TARFLOW_MODULE, "eval"]


def test_every_launcher_builds_it_the_same_way(tmp_path):
    script = slurm.render_sbatch(slurm.SlurmJob(run_dir=str(tmp_path / "run"), nodes=2, nproc_per_node=4))
    expected = " ".join(torchrun_options(nnodes='"$SLURM_NNODES"', nproc_per_node=4,
                                         rdzv_endpoint='"$HEAD_NODE:$RDZV_PORT"', rdzv_id='"$SLURM_JOB_ID"'))
    assert f"-m torch.distributed.run {expected} -m {TARFLOW_MODULE} train" in script
    pod = k8s._command(k8s.K8sJob(name="t", image="i", nodes=2, nproc_per_node=4))
    assert pod[:9] == torchrun_command([], python="python", nnodes=2, nproc_per_node=4,
                                       rdzv_endpoint="$(MASTER_ADDR):$(MASTER_PORT)", rdzv_id="$(TARFLOW_JOB_ID)",
                                       max_restarts=3)
    assert pod[9:12] == tarflow_program("train")
    env = {"SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_ID": "12"}
    task = array_task.child_argv({"argv": ["a=1"], "nproc_per_node": 4}, env)
    assert task[:9] == torchrun_command([], nnodes=2, nproc_per_node=4, rdzv_endpoint=task[6].split("=", 1)[1],
                                        rdzv_id="12")
    assert task[6].startswith("--rdzv_endpoint=n1:") and task[9:] == tarflow_program("train", "a=1",
                                                                                     "logging.progress=false")
    assert array_task.child_argv({"argv": ["a=1"]}, {}) == [sys.executable, *tarflow_program(
        "train", "a=1", "logging.progress=false")]
