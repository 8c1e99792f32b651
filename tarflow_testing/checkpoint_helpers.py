"""Reading what training wrote, for assertions: the torch-format (single/DDP) state of a checkpoint, its steps."""

import tempfile
from pathlib import Path

import torch

from trainer.checkpoint import CheckpointManager, Ranks
from trainer.checkpoint.export import locate
from trainer.stores import open_store


def steps(root) -> list[int]:
    """Complete checkpoints under a root (directory or s3://…)."""
    return CheckpointManager(open_store(str(root)), Path(tempfile.gettempdir()), Ranks()).steps()


def strategy_state(uri) -> dict:
    """{"model", "optimizer"} of a single/DDP checkpoint (``…/step-NNNNNNNN``, or a root: its newest), verified."""
    manager, found = locate(str(uri))
    step = found[-1]
    with tempfile.TemporaryDirectory() as tmp:
        restored = manager.restore(step, Path(tmp))
        assert restored is not None, f"{uri} does not verify"
        _, directory = restored
        return torch.load(directory / "model_optimizer.pt", map_location="cpu", weights_only=True)


def model_state(uri, weights: str = "raw") -> dict:
    """The consolidated fp32 model of any strategy's checkpoint (or a root's newest): as trained, or its weight
    average (``weights="ema"``)."""
    from trainer.checkpoint.export import consolidated_model

    return consolidated_model(str(uri), weights).state
