"""The check ``tarflow launch slurm|k8s`` runs before it renders or submits a job: the trainer's own validation of the
config, for the number of processes the launch will start. It lives here, where the CLI composes the packages,
because ``cluster`` may not import the trainer."""

from __future__ import annotations

from trainer.config import ConfigError, load_config, validate
from trainer.strategies import DISTRIBUTED, check_strategy_config


def check_launch_config(config: str | None, overrides: list[str], nodes: int, nproc_per_node: int) -> None:
    """Raise a ConfigError naming the flag or key to change if the job would fail when it starts."""
    # one process first (a batch that does not split over one rank does not split over more), then the launch's
    cfg = load_config(config, overrides)
    world_size = nodes * nproc_per_node
    processes = f"--nodes {nodes} × --nproc-per-node {nproc_per_node} = {world_size} processes"
    strategy = cfg.train.strategy
    if strategy not in DISTRIBUTED and world_size > 1:
        raise ConfigError(f"train.strategy={strategy} trains in one process, but the launch starts {processes}: set "
                          f"train.strategy to one of {sorted(DISTRIBUTED)}, or launch --nodes 1 --nproc-per-node 1")
    try:
        validate(cfg, world_size)
    except ConfigError as e:
        raise ConfigError(f"{e} (the launch starts {processes})") from None
    check_strategy_config(cfg, world_size)
