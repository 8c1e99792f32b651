"""Checkpoints in the run directory: written atomically, newest complete one found by listing.

A checkpoint is one file ``step-NNNNNNNN.pt`` holding the strategy's state (model, optimizer), the run state (step,
RNG states, data position, counters) and the resolved config. It is written to a temporary name, flushed to disk
and renamed into place, so a crash leaves either the previous checkpoints or a complete new one, never a torn file.
The manager is the seam a later store (S3), sharded formats and a commit protocol plug into; the loop only calls
``save`` and ``load_latest``.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1
_NAME = re.compile(r"step-(\d{8})\.pt")


class CheckpointError(RuntimeError):
    pass


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_checkpoint_file(path: str | Path) -> dict:
    """Load with ``weights_only=True``; an unreadable file is a CheckpointError naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or corrupt: torch raises several types
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e}); "
                              f"it may be truncated or not a checkpoint") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a tarflow checkpoint of format {FORMAT_VERSION}")
    return state


class CheckpointManager:
    """Keeps the newest ``keep`` checkpoints of one run in ``directory``."""

    def __init__(self, directory: str | Path, keep: int = 2):
        self.directory = Path(directory)
        self.keep = keep

    def path_for(self, step: int) -> Path:
        return self.directory / f"step-{step:08d}.pt"

    def steps(self) -> list[int]:
        if not self.directory.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.directory.iterdir() if (m := _NAME.fullmatch(p.name)))

    def save(self, step: int, state: dict) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path_for(step)
        atomic_torch_save({"format": FORMAT_VERSION, "step": step, **state}, path)
        # Retention looks only below the step just written: it is never deleted, nor anything newer than it.
        older = [s for s in self.steps() if s < step]
        for old in older[: max(0, len(older) - (self.keep - 1))]:
            self.path_for(old).unlink(missing_ok=True)
        return path

    def load_latest(self) -> dict | None:
        """The newest readable checkpoint; an unreadable newer one is reported and skipped, never deleted."""
        steps = self.steps()
        for step in reversed(steps):
            try:
                return load_checkpoint_file(self.path_for(step))
            except CheckpointError as e:
                warnings.warn(f"skipping {e}", stacklevel=2)
        if steps:  # starting over would write new checkpoints among the broken ones
            raise CheckpointError(f"{self.directory} holds checkpoints {steps} but none is readable; move them "
                                  f"away to start over, or point train.resume at a good checkpoint")
        return None

    def resume(self, resume: str) -> dict | None:
        """``auto``: newest checkpoint here, if any; ``never``: start fresh; otherwise a checkpoint path."""
        if resume == "never":
            return None
        if resume == "auto":
            return self.load_latest()
        return load_checkpoint_file(resume)
