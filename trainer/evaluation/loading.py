"""Checkpoint → model: the one loader of every command that takes a checkpoint URI."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from models import TarFlow
from models.pretrained import is_pretrained_directory, read_pretrained_metadata
from models.tarflow import check_state_dict_matches

from ..checkpoint.export import consolidated_model
from ..checkpoint.files import CheckpointError
from ..config import Config


class LoadedModel(NamedTuple):
    model: TarFlow  # in eval mode
    config: Config
    weights: str    # "ema" (the run's weight average) or "raw" (as trained): what records and file names report


def load_model(uri: str, device: torch.device, weights: str | None = None) -> LoadedModel:
    """The model of any checkpoint URI (a step directory, a root, an exported file, a ``save_pretrained``
    directory) on ``device``, with ``weights`` (ema | raw | None: the average when there is one); a state dict that
    does not match its config names the first bad key."""
    if is_pretrained_directory(uri):
        # It holds only the architecture: the rest of the config (data, sampling) is the default's.
        model = TarFlow.from_pretrained(uri, map_location=device)
        held = read_pretrained_metadata(uri).get("weights", "raw")
        if weights not in (None, held):
            raise CheckpointError(f"{uri} holds the {held} weights only, not {weights}; export it again from the "
                                  f"checkpoint with --weights {weights}")
        return LoadedModel(model, dataclasses.replace(Config(), model=model.config), held)
    state, cfg, _, held = consolidated_model(uri, weights)
    model = TarFlow(cfg.model)
    check_state_dict_matches(model, state)
    model.load_state_dict(state)
    return LoadedModel(model.to(device).eval(), cfg, held)
