"""Everything besides the model and optimizer that a resumed run needs to continue exactly."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

import torch


def capture_rng(device: torch.device) -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict, device: torch.device) -> None:
    random.setstate(_as_python_random_state(state["python"]))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _as_python_random_state(state):
    # A weights_only load returns the nested tuples as lists; random.setstate needs tuples.
    version, internal, gauss = state
    return version, tuple(internal), gauss


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too


@dataclass
class RunState:
    step: int = 0                  # optimizer steps taken (skipped non-finite steps included)
    images_seen: int = 0
    nonfinite_total: int = 0
    nonfinite_consecutive: int = 0
    initial_bits_per_dim: float | None = None
    loader: dict = field(default_factory=dict)
    rng: list = field(default_factory=list)  # every rank's RNG states, in rank order
    metric_window: dict = field(default_factory=dict)  # metric sums since the last log line
    # Which steps ran under which config: trainer.resume_policy's entries, in step order. In the checkpoint, so that
    # a run continued from S3 alone keeps it.
    config_history: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunState":
        return cls(**d)
