"""cluster.env: who a process is, from each launcher's and scheduler's variables (the real names they set)."""

import os

import pytest

from cluster.env import ProcessEnv, discover, slurm_master_port, tasks_per_node
from cluster.hostlist import expand_hostlist, first_host


def test_no_variables_is_a_single_process():
    env = discover({})
    assert env == ProcessEnv()
    assert (env.rank, env.world_size, env.num_nodes, env.job_id, env.cluster) == (0, 1, 1, None, "none")
    assert not env.distributed and env.is_main


def test_torchrun():
    env = discover({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
                    "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "TORCHELASTIC_RESTART_COUNT": "2",
                    "TORCHELASTIC_RUN_ID": "abc"})
    assert env == ProcessEnv(rank=3, world_size=4, local_rank=1, local_world_size=2, node_rank=1, num_nodes=2,
                             master_addr="10.0.0.1", master_port=29500, restart_count=2, scheduler="torchrun")
    assert env.distributed and not env.is_main and env.init_method == "env://"


# what a rank started by torchrun inside an srun task sees: torchrun's variables over SLURM's task variables
SLURM_TASK = {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "1", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2",
              "SLURM_LOCALID": "0", "SLURM_NODEID": "1", "SLURM_NNODES": "2", "SLURM_TASKS_PER_NODE": "1(x2)",
              "SLURM_JOB_NODELIST": "gpu[07-08]"}
TORCHRUN_RANK = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
                 "MASTER_ADDR": "gpu07", "MASTER_PORT": "41000", "TORCHELASTIC_RESTART_COUNT": "0",
                 "TORCHELASTIC_RUN_ID": "4242"}


def test_torchrun_inside_slurm_takes_the_job_and_its_requeues_from_slurm():
    env = discover({**SLURM_TASK, **TORCHRUN_RANK, "SLURM_RESTART_COUNT": "2"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (5, 8, 1, 4)  # torchrun's ranks
    assert (env.node_rank, env.num_nodes, env.master_addr, env.master_port) == (1, 2, "gpu07", 41000)
    assert (env.scheduler, env.cluster, env.job_id, env.restart_count) == ("torchrun", "slurm", "4242", 2)


def test_restart_count_adds_requeues_and_torchrun_restarts():
    env = discover({**SLURM_TASK, **TORCHRUN_RANK, "SLURM_RESTART_COUNT": "2", "TORCHELASTIC_RESTART_COUNT": "1"})
    assert env.restart_count == 3


def test_torchrun_inside_a_kubernetes_pod():
    env = discover({**TORCHRUN_RANK, "JOB_COMPLETION_INDEX": "1", "TARFLOW_NNODES": "2", "TARFLOW_NPROC_PER_NODE": "4",
                    "TARFLOW_JOB_ID": "tarflow-digits", "TARFLOW_RESTART_COUNT": "1"})
    assert (env.rank, env.world_size, env.node_rank, env.scheduler) == (5, 8, 1, "torchrun")
    assert (env.cluster, env.job_id, env.restart_count) == ("k8s", "tarflow-digits", 1)


def test_srun_task_without_torchrun():
    env = discover({"SLURM_JOB_ID": "1234", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_NTASKS": "4",
                    "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_NNODES": "2", "SLURM_TASKS_PER_NODE": "2(x2)",
                    "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_RESTART_COUNT": "1"})
    assert env == ProcessEnv(rank=3, world_size=4, local_rank=1, local_world_size=2, node_rank=1, num_nodes=2,
                             master_addr="gpu07", master_port=10000 + 1234, restart_count=1, scheduler="slurm",
                             job_id="1234", cluster="slurm")
    assert env.init_method == "tcp://gpu07:11234"  # no torchrun: nobody exported MASTER_ADDR for env://


def test_srun_step_variables_win_over_the_jobs():
    """A step on part of the allocation: its own task counts and node list, not the job's."""
    env = discover({"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "3", "SLURM_PROCID": "0", "SLURM_NTASKS": "9",
                    "SLURM_STEP_NUM_TASKS": "2", "SLURM_NNODES": "3", "SLURM_STEP_NUM_NODES": "1",
                    "SLURM_TASKS_PER_NODE": "3(x3)", "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_NODEID": "0",
                    "SLURM_JOB_NODELIST": "n[1-3]", "SLURM_STEP_NODELIST": "n3", "MASTER_PORT": "29400"})
    assert (env.world_size, env.num_nodes, env.local_world_size, env.master_addr, env.master_port) == \
        (2, 1, 2, "n3", 29400)


def test_srun_uneven_tasks_per_node():
    base = {"SLURM_JOB_ID": "9", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "3", "SLURM_NNODES": "2",
            "SLURM_TASKS_PER_NODE": "2,1", "SLURM_JOB_NODELIST": "a,b"}
    env = discover({**base, "SLURM_PROCID": "2", "SLURM_NODEID": "1", "SLURM_LOCALID": "0"})
    assert (env.local_world_size, env.num_nodes, env.node_rank, env.master_addr) == (1, 2, 1, "a")
    env = discover({"SLURM_JOB_ID": "9", "SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_NTASKS": "4",
                    "SLURM_NNODES": "2", "SLURM_NODEID": "0", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "2",
                    "SLURM_JOB_NODELIST": "x1"})
    assert env.local_world_size == 2


def test_tasks_started_without_torchrun_get_torchruns_variables_in_their_process_group(monkeypatch):
    """For the libraries that read them (mosaicml-streaming); set while the group lives, then gone again."""
    import socket

    import torch

    from trainer.distributed import process_group

    env = discover({"SLURM_JOB_ID": "1234", "SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "1",
                    "SLURM_NNODES": "1", "SLURM_TASKS_PER_NODE": "1", "SLURM_JOB_NODELIST": "localhost"})
    assert env.launcher_variables() == {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                                        "GROUP_RANK": "0", "MASTER_ADDR": "localhost", "MASTER_PORT": "11234"}
    assert discover({"RANK": "0", "WORLD_SIZE": "1"}).launcher_variables() == {} == ProcessEnv().launcher_variables()
    with socket.socket() as sock:  # a free port for the tcp:// rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = ProcessEnv(scheduler="slurm", master_addr="127.0.0.1", master_port=port)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with process_group(env, torch.device("cpu")):
        assert torch.distributed.is_initialized()
        assert (os.environ["RANK"], os.environ["LOCAL_WORLD_SIZE"], os.environ["MASTER_PORT"]) == ("0", "1", str(port))
    assert not torch.distributed.is_initialized() and "RANK" not in os.environ and "MASTER_PORT" not in os.environ


def test_the_batch_script_is_one_process_of_a_job():
    """SLURM_PROCID and SLURM_NTASKS are set in the batch script too; without a step it is not a task."""
    env = discover({"SLURM_JOB_ID": "55", "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_NNODES": "2",
                    "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_RESTART_COUNT": "3"})
    assert (env.world_size, env.scheduler, env.cluster, env.job_id, env.restart_count) == (1, "none", "slurm", "55", 3)


def test_indexed_job_pod_without_torchrun():
    env = discover({"JOB_COMPLETION_INDEX": "1", "TARFLOW_NNODES": "2", "MASTER_ADDR": "tf-0.tf",
                    "MASTER_PORT": "29500", "TARFLOW_JOB_ID": "tf"})
    assert env == ProcessEnv(rank=1, world_size=2, node_rank=1, num_nodes=2, master_addr="tf-0.tf",
                             master_port=29500, scheduler="k8s", job_id="tf", cluster="k8s")
    assert env.init_method == "tcp://tf-0.tf:29500"


def test_pytorchjob_pod_without_torchrun_is_one_process_per_pod():
    """The operator's RANK/WORLD_SIZE count pods; with no launcher in the pod each pod is one rank on its node."""
    env = discover({"RANK": "2", "WORLD_SIZE": "3", "MASTER_ADDR": "tf-master-0", "MASTER_PORT": "23456",
                    "PYTHONUNBUFFERED": "0"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.node_rank, env.num_nodes) == \
        (2, 3, 0, 1, 2, 3)


def test_slurm_port_is_derived_from_the_job_id_below_the_ephemeral_range():
    assert slurm_master_port("1") == 10001
    assert all(10000 <= slurm_master_port(str(j)) < 30000 for j in (0, 19999, 20000, 987654321))


@pytest.mark.parametrize("text, counts", [("1", [1]), ("2(x3)", [2, 2, 2]), ("2(x3),1", [2, 2, 2, 1]),
                                          ("4,2(x2)", [4, 2, 2])])
def test_tasks_per_node(text, counts):
    assert tasks_per_node(text) == counts


@pytest.mark.parametrize("hostlist, hosts", [
    ("node1", ["node1"]),
    ("node[01-04,07],gpu-a1", ["node01", "node02", "node03", "node04", "node07", "gpu-a1"]),
    ("n[1-2]-ib", ["n1-ib", "n2-ib"]),
    ("n[08-10]", ["n08", "n09", "n10"]),                      # the width of the lower bound is kept
    ("r[1-2]-n[1-2]", ["r1-n1", "r1-n2", "r2-n1", "r2-n2"]),  # several groups multiply out
    ("a,b[3],c", ["a", "b3", "c"]),
    ("gpu-a1.cluster.local", ["gpu-a1.cluster.local"]),
])
def test_hostlist_expansion(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts
    assert first_host(hostlist) == hosts[0]


@pytest.mark.parametrize("hostlist, message", [
    ("", "empty host list"), ("n[1-", "unbalanced '\\['"), ("n1]", "unbalanced '\\]'"), ("n[]", "empty brackets"),
    ("n[3-1]", "descending range '3-1'"), ("n[a-b]", "bad range 'a-b'"), ("a,,b", "empty host name"),
    ("n[[1]]", "nested"),
])
def test_malformed_hostlists(hostlist, message):
    with pytest.raises(ValueError, match=message):
        expand_hostlist(hostlist)


SRUN = {"SLURM_JOB_ID": "1", "SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_NNODES": "2",
        "SLURM_NODEID": "0", "SLURM_LOCALID": "0", "SLURM_TASKS_PER_NODE": "1(x2)", "SLURM_JOB_NODELIST": "n[1-2]"}


@pytest.mark.parametrize("environ, message", [
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 is not below WORLD_SIZE=2"),
    ({"RANK": "0"}, "WORLD_SIZE is not set"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE=0 must be >= 1"),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "2"}, "LOCAL_RANK=3 is not below"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "70000"}, "MASTER_PORT=70000 is not a TCP port"),
    ({**TORCHRUN_RANK, "SLURM_JOB_ID": "12a"}, "SLURM_JOB_ID='12a' is not an integer"),
    ({**TORCHRUN_RANK, "SLURM_JOB_ID": "1", "SLURM_RESTART_COUNT": "-1"}, "SLURM_RESTART_COUNT=-1 must be >= 0"),
    ({**SRUN, "SLURM_PROCID": "x"}, "SLURM_PROCID='x' is not an integer"),
    ({**SRUN, "SLURM_PROCID": "2"}, "SLURM_PROCID=2 is not below SLURM_NTASKS=2"),
    ({**SRUN, "SLURM_NODEID": "2"}, "SLURM_NODEID=2 is not below SLURM_NNODES=2"),
    ({**SRUN, "SLURM_LOCALID": "1"}, "SLURM_LOCALID=1 is not below tasks on this node=1"),
    ({**SRUN, "SLURM_TASKS_PER_NODE": "2(x)"}, r"SLURM_TASKS_PER_NODE='2\(x\)' is not of the form"),
    ({**SRUN, "SLURM_JOB_NODELIST": "n[1-"}, r"SLURM_JOB_NODELIST='n\[1-': unbalanced"),
    ({"JOB_COMPLETION_INDEX": "2", "TARFLOW_NNODES": "2"}, "JOB_COMPLETION_INDEX=2 is not below TARFLOW_NNODES=2"),
    ({"JOB_COMPLETION_INDEX": "0"}, "TARFLOW_NNODES is not"),
    ({"JOB_COMPLETION_INDEX": "one", "TARFLOW_NNODES": "2"}, "JOB_COMPLETION_INDEX='one' is not an integer"),
    ({"JOB_COMPLETION_INDEX": "0", "TARFLOW_NNODES": "2", "TARFLOW_NPROC_PER_NODE": "4"},
     "TARFLOW_NPROC_PER_NODE=4 but this process was not started by torchrun"),
])
def test_malformed_values_are_clear_errors(environ, message):
    with pytest.raises(ValueError, match=message):
        discover(environ)
