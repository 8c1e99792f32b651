"""Real training processes for tests and benchmarks: free ports, torchrun on loopback, a tiny model's overrides."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.channels=32", "model.head_dim=16", "model.num_blocks=2", "model.layers_per_block=1",
        "train.global_batch=32", "train.micro_batch=8", "schedule.warmup_steps=2", "optim.lr=3e-3",
        "eval.every=0", "sample.every=0", "sample.num=4", "logging.every=2", "logging.progress=false"]


def free_port() -> int:
    """A port nobody listens on now (fixed ports collide with a previous run's lingering rendezvous socket)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node=NPROC ARGS`` with c10d on a free loopback port; asserts it succeeded."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
           f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-backend=c10d", *args]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def two_agents(args: list[str]) -> list[str]:
    """Two torchrun agents of one process each (--nnodes=2) meeting through c10d on loopback: two "nodes"."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    port = free_port()
    agents = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", f"--node_rank={node}",
         "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=two-nodes-{port}", *args],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for node in (0, 1)]
    outputs = [agent.communicate(timeout=300)[0] for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    return outputs
