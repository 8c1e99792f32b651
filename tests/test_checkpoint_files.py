"""Atomic local writes and the one-file model format."""

import pytest
import torch

from trainer.checkpoint import CheckpointError, atomic_torch_save, load_checkpoint_file


def test_a_failed_write_leaves_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "x.pt"
    atomic_torch_save({"a": 1}, path)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        atomic_torch_save({"a": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]


def test_foreign_files_are_rejected(tmp_path):
    path = tmp_path / "model.pth"
    torch.save({"blocks.0.pos_embed": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not a tarflow checkpoint"):
        load_checkpoint_file(path)
