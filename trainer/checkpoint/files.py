"""Local files written atomically (tmp + fsync + rename), and the one-file model format: an exported model
(``tarflow ckpt export``, ``ckpt import-reference``) holds the model's state dict and the resolved config."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1  # of the one-file model format


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written, found, verified or loaded; the message names it."""


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


def load_torch_file(path: str | Path, map_location: str | torch.device = "cpu", shown_as: str | Path | None = None):
    """``torch.load(weights_only=True)``; a pickle it refuses or cannot parse is a one-line CheckpointError naming the
    file (``shown_as``: the checkpoint a temporary conversion came from). torch's own message spans lines, names no
    file and suggests ``weights_only=False``, which would run whatever the pickle asks for."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(_unpickling_message(shown_as or path, e)) from None


def _unpickling_message(path: str | Path, error: pickle.UnpicklingError) -> str:
    text = str(error)
    marker = "WeightsUnpickler error: "
    # torch's reason, e.g. "Unsupported global: GLOBAL pkg.Class was not an allowed global by default. Please use ..."
    reason = _first_line(text.split(marker, 1)[1]).split(". ", 1)[0] if marker in text else _first_line(text)
    if reason.startswith("Unsupported global"):
        return (f"checkpoint file {path} holds objects torch.load(weights_only=True) refuses to unpickle ({reason}); "
                f"tarflow writes only tensors and plain containers, so the file was not written by tarflow or was "
                f"altered")
    return f"checkpoint file {path} is unreadable (UnpicklingError: {reason}); it may be truncated or not a checkpoint"


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def load_checkpoint_file(path: str | Path) -> dict:
    """Load with ``weights_only=True``; an unreadable file is a CheckpointError naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = load_torch_file(path)
    except CheckpointError:
        raise
    except Exception as e:  # truncated or corrupt: torch raises several types
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(e).__name__}: {_first_line(str(e))}); "
                              f"it may be truncated or not a checkpoint") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a tarflow checkpoint of format {FORMAT_VERSION}")
    return state
