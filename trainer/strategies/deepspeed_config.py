"""The DeepSpeed config dict, built from our own sections so that batch, accumulation, clipping, precision and the
optimizer mean the same for every strategy. An expert DeepSpeed JSON (``deepspeed.config``) may add settings we do
not own (bucket sizes, overlap, offload, …); a value that contradicts one of ours is an error, never a silent
override. Pure Python: importable and testable without DeepSpeed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError

# Which of our keys each DeepSpeed setting comes from (for error messages).
_OWNER = {
    "train_batch_size": "train.global_batch",
    "train_micro_batch_size_per_gpu": "train.micro_batch",
    "gradient_accumulation_steps": "train.global_batch / (train.micro_batch × ranks)",
    "gradient_clipping": "optim.grad_clip",
    "zero_optimization.stage": "deepspeed.stage",
    "bf16.enabled": "train.precision",
    "fp16.enabled": "train.precision (fp16 is not supported: bf16 or fp32)",
    "communication_data_type": "fp32 gradient reduction (likelihood training is sensitive to bf16 reductions)",
    "data_types.grad_accum_dtype": "fp32 gradient accumulation",
    "managed_gradient_accumulation": "the training loop (it owns the accumulation boundary)",
    "zero_allow_untested_optimizer": "optim (our AdamW is the client optimizer)",
}
# Sections we build ourselves from other config keys; an expert JSON must not bring its own.
_FORBIDDEN = {
    "optimizer": "the optimizer is AdamW built from the optim section",
    "scheduler": "the learning rate comes from the schedule section",
    "train_batch_size": None, "train_micro_batch_size_per_gpu": None,  # owned, checked for equality only
}


def build_deepspeed_config(cfg: Config, world_size: int, bf16: bool) -> dict[str, Any]:
    """Ours, then the expert JSON merged in (conflicts are ConfigErrors naming both sides)."""
    t = cfg.train
    ours: dict[str, Any] = {
        "train_batch_size": t.global_batch,
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.global_batch // (t.micro_batch * world_size),
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.deepspeed.stage},
        # bf16 parameters for compute with fp32 master weights in the optimizer, like FSDP's MixedPrecisionPolicy;
        # a non-finite gradient skips the step (as for the other strategies).
        "bf16": {"enabled": bf16, "check_grad_overflow": True},
        "fp16": {"enabled": False},
        "communication_data_type": "fp32",
        "data_types": {"grad_accum_dtype": "fp32"},
        # backward() only accumulates; step() is the boundary: reduce, clip, update (our loop's contract).
        "managed_gradient_accumulation": False,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # our metric sinks log; DeepSpeed's own progress lines would duplicate them
        "wall_clock_breakdown": False,
    }
    if not cfg.deepspeed.config:
        return ours
    path = Path(cfg.deepspeed.config)
    if not path.is_file():
        raise ConfigError(f"deepspeed.config: {path} does not exist")
    try:
        expert = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed.config: {path} is not valid JSON: {e}") from None
    if not isinstance(expert, dict):
        raise ConfigError(f"deepspeed.config: {path} must hold a JSON object")
    for key, why in _FORBIDDEN.items():
        if why and key in expert:
            raise ConfigError(f"deepspeed.config: {path} sets '{key}', but {why}; remove it from the JSON")
    return _merge(ours, expert, str(path), prefix="")


def _merge(ours: dict, expert: dict, origin: str, prefix: str) -> dict:
    merged = dict(ours)
    for key, value in expert.items():
        full = f"{prefix}{key}"
        if key not in ours:
            merged[key] = value
        elif isinstance(ours[key], dict) and isinstance(value, dict):
            merged[key] = _merge(ours[key], value, origin, prefix=f"{full}.")
        elif not _same(ours[key], value):
            owner = _OWNER.get(full, "our config")
            raise ConfigError(f"deepspeed.config: {origin} sets '{full}'={value!r}, which contradicts {owner} "
                              f"(= {ours[key]!r}); set it through our config instead, or remove it from the JSON")
    return merged


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, str) and isinstance(b, str):
        return a.lower() == b.lower()
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or (isinstance(b, str) and str(a).lower() == b.lower())
    return a == b
