"""Checkpoints: each strategy's own format, written through a store (local directory or S3) under a commit protocol
(``manager``); one-file model exports (``files``)."""

from .files import FORMAT_VERSION, CheckpointError, atomic_torch_save, atomic_write_text, load_checkpoint_file
from .manager import CheckpointManager, Ranks, SaveResult
from .manifest import MANIFEST, Manifest, parse_step, split_checkpoint_uri, step_name

__all__ = ["FORMAT_VERSION", "CheckpointError", "atomic_torch_save", "atomic_write_text", "load_checkpoint_file",
           "CheckpointManager", "Ranks", "SaveResult", "MANIFEST", "Manifest", "parse_step", "split_checkpoint_uri",
           "step_name"]
