"""Who this process is: one function, one dataclass. The trainer asks only this, never the scheduler's variables.

Sources, first match wins:
1. torchrun (LOCAL_RANK or TORCHELASTIC_RUN_ID set): RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK,
   MASTER_ADDR, MASTER_PORT, TORCHELASTIC_RESTART_COUNT. A bare RANK + WORLD_SIZE (a hand-made env:// launch, or a
   Kubeflow PyTorchJob pod, whose RANK/WORLD_SIZE count pods) is read the same way, one process per node.
2. a SLURM task started by srun (SLURM_PROCID with SLURM_STEP_ID): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID,
   SLURM_NODEID, SLURM_NNODES, SLURM_[STEP_]TASKS_PER_NODE / SLURM_NTASKS_PER_NODE, SLURM_[STEP|JOB]_NODELIST.
3. a Kubernetes Indexed Job pod (JOB_COMPLETION_INDEX): the index is the node rank; the manifests of cluster.k8s
   set TARFLOW_NNODES, TARFLOW_NPROC_PER_NODE, MASTER_ADDR and MASTER_PORT beside it.
4. otherwise one process.

Whatever supplied the ranks, the job's identity comes from the scheduler that owns the job: SLURM_JOB_ID and
SLURM_RESTART_COUNT (so a requeued job knows it was requeued even though torchrun starts counting at 0 again), or
TARFLOW_JOB_ID and TARFLOW_RESTART_COUNT set by our Kubernetes manifests. Malformed values raise ValueError naming
the variable and its value.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping

from .hostlist import first_host


@dataclass(frozen=True)
class ProcessEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    restart_count: int = 0    # attempts before this one: scheduler requeues + torchrun restarts
    scheduler: str = "none"   # who supplied the ranks: none | torchrun | slurm | k8s
    num_nodes: int = 0        # 0 = derive: world_size // local_world_size (uniform nodes)
    job_id: str | None = None
    cluster: str = "none"     # who owns the job (its id, its requeues): none | slurm | k8s

    def __post_init__(self) -> None:
        if self.num_nodes == 0:  # frozen: set the derived default once, so equal environments compare equal
            object.__setattr__(self, "num_nodes", max(1, self.world_size // max(1, self.local_world_size)))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def init_method(self) -> str:
        """For torch.distributed.init_process_group: torchrun exports MASTER_ADDR/PORT itself (env://); a task
        started directly by srun or as a pod has them only here."""
        if self.scheduler in ("none", "torchrun") or self.master_addr is None or self.master_port is None:
            return "env://"
        return f"tcp://{self.master_addr}:{self.master_port}"

    def launcher_variables(self) -> dict[str, str]:
        """The variables torchrun gives each rank, for libraries that read them (mosaicml-streaming reads RANK,
        WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE). Empty where torchrun, or nobody, started this process."""
        if self.scheduler in ("none", "torchrun"):
            return {}
        out = {"RANK": self.rank, "WORLD_SIZE": self.world_size, "LOCAL_RANK": self.local_rank,
               "LOCAL_WORLD_SIZE": self.local_world_size, "GROUP_RANK": self.node_rank,
               "MASTER_ADDR": self.master_addr, "MASTER_PORT": self.master_port}
        return {k: str(v) for k, v in out.items() if v is not None}


def _int(environ: Mapping[str, str], name: str, default: int | None = None, minimum: int = 0) -> int:
    raw = environ.get(name)
    if raw is None:
        if default is None:
            raise ValueError(f"{name} is not set")
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ValueError(f"{name}={value} must be >= {minimum}")
    return value


def _port(environ: Mapping[str, str], name: str = "MASTER_PORT") -> int | None:
    if name not in environ:
        return None
    port = _int(environ, name, minimum=1)
    if port > 65535:
        raise ValueError(f"{name}={port} is not a TCP port (1-65535)")
    return port


def _below(name: str, value: int, limit_name: str, limit: int) -> None:
    if value >= limit:
        raise ValueError(f"{name}={value} is not below {limit_name}={limit}")


_TASKS_ITEM = re.compile(r"^(\d+)(?:\(x(\d+)\))?$")


def tasks_per_node(text: str, name: str = "SLURM_TASKS_PER_NODE") -> list[int]:
    """SLURM's run-length form, one entry per node: ``2(x3),1`` → [2, 2, 2, 1]."""
    counts: list[int] = []
    for item in text.split(","):
        m = _TASKS_ITEM.match(item.strip())
        if not m:
            raise ValueError(f"{name}={text!r} is not of the form N or N(xK),... (e.g. 2(x3),1)")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def slurm_master_port(job_id: str) -> int:
    """A port every task of a job agrees on without talking: 10000-29999, below Linux's ephemeral range."""
    return 10000 + int(job_id) % 20000


def _owner(environ: Mapping[str, str]) -> tuple[str, str | None, int]:
    """(cluster, job id, scheduler restart count) of the job this process belongs to."""
    if "SLURM_JOB_ID" in environ:
        _int(environ, "SLURM_JOB_ID")  # validate: ports are derived from it
        return "slurm", environ["SLURM_JOB_ID"], _int(environ, "SLURM_RESTART_COUNT", default=0)
    if "TARFLOW_JOB_ID" in environ or "JOB_COMPLETION_INDEX" in environ:
        return "k8s", environ.get("TARFLOW_JOB_ID"), _int(environ, "TARFLOW_RESTART_COUNT", default=0)
    return "none", None, 0


def _from_torchrun(environ: Mapping[str, str]) -> ProcessEnv:
    world = _int(environ, "WORLD_SIZE", minimum=1)
    rank = _int(environ, "RANK")
    local_world = _int(environ, "LOCAL_WORLD_SIZE", default=world if "LOCAL_RANK" in environ else 1, minimum=1)
    local_rank = _int(environ, "LOCAL_RANK", default=rank % local_world)
    _below("RANK", rank, "WORLD_SIZE", world)
    _below("LOCAL_RANK", local_rank, "LOCAL_WORLD_SIZE", local_world)
    cluster, job_id, requeues = _owner(environ)
    return ProcessEnv(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world,
                      node_rank=_int(environ, "GROUP_RANK", default=rank // local_world),
                      master_addr=environ.get("MASTER_ADDR"), master_port=_port(environ),
                      restart_count=requeues + _int(environ, "TORCHELASTIC_RESTART_COUNT", default=0),
                      scheduler="torchrun", job_id=job_id, cluster=cluster)


def _from_srun(environ: Mapping[str, str]) -> ProcessEnv:
    rank = _int(environ, "SLURM_PROCID")
    world = _int(environ, "SLURM_STEP_NUM_TASKS", default=_int(environ, "SLURM_NTASKS", default=1, minimum=1),
                 minimum=1)
    nodes = _int(environ, "SLURM_STEP_NUM_NODES", default=_int(environ, "SLURM_NNODES", default=1, minimum=1),
                 minimum=1)
    node_rank = _int(environ, "SLURM_NODEID", default=0)
    local_rank = _int(environ, "SLURM_LOCALID", default=0)
    _below("SLURM_PROCID", rank, "SLURM_NTASKS", world)
    _below("SLURM_NODEID", node_rank, "SLURM_NNODES", nodes)
    # tasks on this node: the step's own count where srun set it, else the job's
    for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE"):
        if name in environ:
            counts = tasks_per_node(environ[name], name)
            local_world = counts[node_rank] if node_rank < len(counts) else counts[-1]
            break
    else:
        local_world = max(1, world // nodes)
    _below("SLURM_LOCALID", local_rank, "tasks on this node", local_world)
    nodelist_var = next((n for n in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
                         if n in environ), None)
    try:
        master = first_host(environ[nodelist_var]) if nodelist_var else None
    except ValueError as e:
        raise ValueError(f"{nodelist_var}={environ[nodelist_var]!r}: {e}") from None
    _, job_id, requeues = _owner(environ)
    port = _port(environ)
    if port is None and job_id is not None:
        port = slurm_master_port(job_id)
    return ProcessEnv(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world,
                      node_rank=node_rank, num_nodes=nodes, master_addr=environ.get("MASTER_ADDR", master),
                      master_port=port, restart_count=requeues, scheduler="slurm", job_id=job_id,
                      cluster="slurm")


def _from_indexed_job(environ: Mapping[str, str]) -> ProcessEnv:
    index = _int(environ, "JOB_COMPLETION_INDEX")
    if "TARFLOW_NNODES" not in environ:
        raise ValueError("JOB_COMPLETION_INDEX is set but TARFLOW_NNODES is not: an Indexed Job pod needs the "
                         "node count beside its index (cluster.k8s manifests set it)")
    nodes = _int(environ, "TARFLOW_NNODES", minimum=1)
    nproc = _int(environ, "TARFLOW_NPROC_PER_NODE", default=1, minimum=1)
    _below("JOB_COMPLETION_INDEX", index, "TARFLOW_NNODES", nodes)
    if nproc > 1:  # several processes per pod need a launcher that numbers them; that launcher wins in discover()
        raise ValueError(f"TARFLOW_NPROC_PER_NODE={nproc} but this process was not started by torchrun")
    _, job_id, requeues = _owner(environ)
    return ProcessEnv(rank=index, world_size=nodes, node_rank=index, num_nodes=nodes,
                      master_addr=environ.get("MASTER_ADDR"), master_port=_port(environ),
                      restart_count=requeues, scheduler="k8s", job_id=job_id, cluster="k8s")


def discover(environ: Mapping[str, str] | None = None) -> ProcessEnv:
    environ = os.environ if environ is None else environ
    if any(k in environ for k in ("LOCAL_RANK", "TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE")):
        return _from_torchrun(environ)
    # SLURM_PROCID alone is also set in the batch script, which is one process, not a task of the step
    if "SLURM_PROCID" in environ and "SLURM_STEP_ID" in environ:
        return _from_srun(environ)
    if "JOB_COMPLETION_INDEX" in environ:
        return _from_indexed_job(environ)
    cluster, job_id, requeues = _owner(environ)
    return ProcessEnv(restart_count=requeues, job_id=job_id, cluster=cluster)
