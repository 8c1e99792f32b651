"""Who this process is: one function, one dataclass. The trainer asks only this, never the scheduler's variables.

Knows torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT, GROUP_RANK,
TORCHELASTIC_RESTART_COUNT); anything else is a single process. SLURM and Kubernetes come with their launchers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class ProcessEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    restart_count: int = 0
    scheduler: str = "none"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


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


def discover(environ: Mapping[str, str] | None = None) -> ProcessEnv:
    environ = os.environ if environ is None else environ
    if "WORLD_SIZE" not in environ and "RANK" not in environ:
        return ProcessEnv()
    world = _int(environ, "WORLD_SIZE", minimum=1)
    rank = _int(environ, "RANK")
    local_world = _int(environ, "LOCAL_WORLD_SIZE", default=world, minimum=1)
    local_rank = _int(environ, "LOCAL_RANK", default=rank % local_world)
    if rank >= world:
        raise ValueError(f"RANK={rank} is not below WORLD_SIZE={world}")
    if local_rank >= local_world:
        raise ValueError(f"LOCAL_RANK={local_rank} is not below LOCAL_WORLD_SIZE={local_world}")
    port = environ.get("MASTER_PORT")
    return ProcessEnv(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world,
                      node_rank=_int(environ, "GROUP_RANK", default=rank // local_world),
                      master_addr=environ.get("MASTER_ADDR"),
                      master_port=_int(environ, "MASTER_PORT") if port is not None else None,
                      restart_count=_int(environ, "TORCHELASTIC_RESTART_COUNT", default=0), scheduler="torchrun")
