import pytest
import torch

from trainer.checkpoint import (CheckpointError, CheckpointManager, atomic_torch_save, load_checkpoint_file)


def state(step):
    return {"strategy": {"model": {"w": torch.full((3,), float(step))}}, "run": {"step": step}}


def test_keeps_the_newest_and_lists_by_step(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2)
    for step in (5, 10, 15):
        manager.save(step, state(step))
    assert manager.steps() == [10, 15]
    latest = manager.load_latest()
    assert latest["step"] == 15 and torch.equal(latest["strategy"]["model"]["w"], torch.full((3,), 15.0))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_an_unreadable_newest_checkpoint_is_skipped_not_deleted(tmp_path):
    manager = CheckpointManager(tmp_path, keep=3)
    manager.save(5, state(5))
    manager.save(10, state(10))
    newest = manager.path_for(10)
    newest.write_bytes(newest.read_bytes()[:100])  # e.g. a disk that lost the tail
    with pytest.warns(UserWarning, match="step-00000010.pt is unreadable"):
        assert manager.load_latest()["step"] == 5
    assert newest.exists()


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


def test_resume_modes(tmp_path):
    manager = CheckpointManager(tmp_path / "ck")
    assert manager.resume("auto") is None
    manager.save(3, state(3))
    assert manager.resume("auto")["step"] == 3
    assert manager.resume("never") is None
    assert manager.resume(str(manager.path_for(3)))["step"] == 3
    with pytest.raises(CheckpointError, match="does not exist"):
        manager.resume(str(tmp_path / "nope.pt"))


def test_foreign_files_are_rejected(tmp_path):
    path = tmp_path / "model.pth"
    torch.save({"blocks.0.pos_embed": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not a tarflow checkpoint"):
        load_checkpoint_file(path)


def test_retention_never_deletes_the_checkpoint_just_written(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2)
    for step in (700, 800, 900):  # e.g. left by an earlier run in the same directory
        manager.save(step, state(step))
    manager.save(100, state(100))
    assert manager.steps() == [100, 800, 900]
    manager.save(200, state(200))
    assert manager.steps() == [100, 200, 800, 900]  # only older ones than the new step are pruned


def test_only_unreadable_checkpoints_is_an_error_not_a_fresh_start(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2)
    manager.save(5, state(5))
    manager.path_for(5).write_bytes(b"garbage")
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match=r"holds checkpoints \[5\] but none is readable"):
        manager.load_latest()
    assert manager.path_for(5).exists()
