"""Checkpoint → model: the one loader of every command that takes a checkpoint URI."""

from __future__ import annotations

import torch

from models import TarFlow
from models.tarflow import check_state_dict_matches

from ..checkpoint.export import consolidated_model
from ..config import Config


def load_model(uri: str, device: torch.device) -> tuple[TarFlow, Config]:
    """(model in eval mode on ``device``, config) of any checkpoint URI (a step directory, a root, an exported
    file); a state dict that does not match its config names the first bad key."""
    state, cfg, _ = consolidated_model(uri)
    model = TarFlow(cfg.model)
    check_state_dict_matches(model, state)
    model.load_state_dict(state)
    return model.to(device).eval(), cfg
