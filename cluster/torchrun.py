"""The command lines every launcher runs, built once: ``tarflow <command> ...`` as a module of this interpreter,
and torchrun (``python -m torch.distributed.run``) over it with a c10d rendezvous.

The launchers differ only in the values: SLURM passes shell expressions (``"$SLURM_NNODES"``), Kubernetes the
kubelet's ``$(VAR)`` expansions, the scaling array task plain numbers.
"""

from __future__ import annotations

import sys
from typing import Sequence

# The module behind the ``tarflow`` entry point: ``python -m TARFLOW_MODULE train ...`` is ``tarflow train ...``.
TARFLOW_MODULE = "tarflow"


def tarflow_program(command: str, *args: str) -> list[str]:
    """What a Python interpreter (or torchrun) runs for ``tarflow COMMAND ARGS...``."""
    return ["-m", TARFLOW_MODULE, command, *args]


def tarflow_command(command: str, *args: str, python: str | None = None) -> list[str]:
    """``tarflow COMMAND ARGS...`` with this interpreter (the same environment as the caller)."""
    return [python or sys.executable, *tarflow_program(command, *args)]


def torchrun_options(*, nnodes: int | str, nproc_per_node: int | str, rdzv_endpoint: str, rdzv_id: str,
                     max_restarts: int = 0) -> list[str]:
    """torchrun's options for a c10d rendezvous on ``rdzv_endpoint`` (host:port). ``max_restarts=0``: restarts are
    the scheduler's job (requeue), so that every attempt starts clean."""
    return [f"--nnodes={nnodes}", f"--nproc_per_node={nproc_per_node}", "--rdzv_backend=c10d",
            f"--rdzv_endpoint={rdzv_endpoint}", f"--rdzv_id={rdzv_id}", f"--max_restarts={max_restarts}"]


def torchrun_command(program: Sequence[str], *, python: str | None = None, **options) -> list[str]:
    """``python -m torch.distributed.run OPTIONS PROGRAM``; ``options`` are ``torchrun_options``'."""
    return [python or sys.executable, "-m", "torch.distributed.run", *torchrun_options(**options), *program]
