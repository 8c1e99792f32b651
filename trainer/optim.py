"""AdamW with the reference's betas and the learning-rate schedule."""

from __future__ import annotations

import torch
from torch import nn

from .config import Config, OptimConfig
from .schedule import WarmupCosine

_NO_DECAY_NAMES = ("pos_embed", "class_embed")


def parameter_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """One group decaying everything (the reference), or decayed matrices + undecayed norms, biases, embeddings."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.decay_norms_biases_embeddings:
        return [{"params": [p for _, p in params], "weight_decay": cfg.weight_decay}]
    exempt = [p for n, p in params if p.dim() < 2 or n.rsplit(".", 1)[-1] in _NO_DECAY_NAMES]
    exempt_ids = {id(p) for p in exempt}
    return [{"params": [p for _, p in params if id(p) not in exempt_ids], "weight_decay": cfg.weight_decay},
            {"params": exempt, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(parameter_groups(model, cfg), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def build_schedule(cfg: Config) -> WarmupCosine:
    """Optimizer step s (0-based) runs at ``schedule.lr(s + 1)``: the first step is already past ``min_lr`` and the
    last lands on it; the rate then holds there if the run is extended."""
    return WarmupCosine(warmup_steps=cfg.schedule.warmup_steps, total_steps=cfg.train.steps, max_lr=cfg.optim.lr,
                        min_lr=cfg.schedule.min_lr)
