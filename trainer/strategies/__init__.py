"""How the model is placed and updated. The loop talks to one small interface (``Strategy``); each way of
distributing training is one class behind it, chosen by ``train.strategy``."""

from __future__ import annotations

import torch

from ..config import Config, FSDPConfig
from .base import StepResult, Strategy
from .ddp import DistributedDataParallel
from .deepspeed_zero import DeepSpeedZeRO
from .fsdp import FullyShardedDataParallel
from .single import SingleDevice

STRATEGIES = {cls.name: cls for cls in (SingleDevice, DistributedDataParallel, FullyShardedDataParallel,
                                         DeepSpeedZeRO)}
# Which class reads each checkpoint format (single and DDP share one).
CHECKPOINT_FORMATS = {cls.checkpoint_format: cls for cls in (SingleDevice, FullyShardedDataParallel, DeepSpeedZeRO)}
DISTRIBUTED = {name for name, cls in STRATEGIES.items() if cls.distributed}


def build_strategy(name: str, device: torch.device, compute_dtype: torch.dtype | None = None,
                   fsdp: FSDPConfig | None = None, nodes: int = 1, deepspeed_config: dict | None = None) -> Strategy:
    if name not in STRATEGIES:
        raise ValueError(f"train.strategy={name!r} is not one of {sorted(STRATEGIES)}")
    if name == "fsdp":
        return FullyShardedDataParallel(device, compute_dtype, fsdp, nodes)
    if name == "deepspeed":
        if deepspeed_config is None:
            raise ValueError("train.strategy=deepspeed needs its config dict (build_deepspeed_config)")
        return DeepSpeedZeRO(device, deepspeed_config)
    return STRATEGIES[name](device)


def strategy_from_config(cfg: Config, device: torch.device, compute_dtype: torch.dtype | None, world_size: int,
                         nodes: int) -> Strategy:
    """The strategy ``train.strategy`` names, with its own section of the config."""
    ds_config = None
    if cfg.train.strategy == "deepspeed":
        from .deepspeed_config import build_deepspeed_config
        ds_config = build_deepspeed_config(cfg, world_size, bf16=compute_dtype is torch.bfloat16)
    return build_strategy(cfg.train.strategy, device, compute_dtype, cfg.fsdp, nodes, ds_config)


def check_strategy_config(cfg: Config, world_size: int) -> None:
    """What can be checked before a process group exists: DeepSpeed installed, an expert JSON agreeing with ours."""
    if cfg.train.strategy == "deepspeed":
        from .deepspeed_config import build_deepspeed_config
        from .deepspeed_zero import require_deepspeed
        require_deepspeed()
        build_deepspeed_config(cfg, world_size, bf16=False)


__all__ = ["STRATEGIES", "CHECKPOINT_FORMATS", "DISTRIBUTED", "Strategy", "StepResult", "build_strategy",
           "strategy_from_config", "check_strategy_config", "SingleDevice", "DistributedDataParallel",
           "FullyShardedDataParallel", "DeepSpeedZeRO"]
