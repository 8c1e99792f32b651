"""Atomic local writes, the one-file model format, and torch.load's refusals as one line naming the file."""

from fractions import Fraction

import pytest
import torch

from trainer.checkpoint import CheckpointError, atomic_torch_save, load_checkpoint_file
from trainer.checkpoint.files import load_torch_file
from trainer.strategies import SingleDevice


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


def test_a_pickle_that_weights_only_refuses_names_the_file_and_what_was_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"format": 1, "step": 3, "note": Fraction(1, 3)}, path)  # any class outside torch's allow-list
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint_file(path)
    message = str(refused.value)
    assert message.startswith(f"checkpoint file {path} holds objects torch.load(weights_only=True) refuses to "
                              f"unpickle (Unsupported global: GLOBAL fractions.Fraction was not an allowed global")
    assert "\n" not in message and "weights_only=False" not in message  # one line; no advice to run the pickle


def test_a_strategy_loading_a_refused_pickle_names_the_file(tmp_path):
    strategy = SingleDevice(torch.device("cpu"))
    torch.save({"model": {}, "optimizer": Fraction(2, 3)}, tmp_path / SingleDevice.FILE)
    with pytest.raises(CheckpointError, match=rf"^checkpoint file {tmp_path / SingleDevice.FILE} holds objects"):
        strategy.load_state(tmp_path)
    with pytest.raises(CheckpointError, match=rf"^checkpoint file {tmp_path / SingleDevice.FILE} holds objects"):
        SingleDevice.export_model_state(tmp_path)


def test_bytes_that_are_no_pickle_are_unreadable_naming_the_file(tmp_path):
    path = tmp_path / "run_state.pt"
    path.write_bytes(b"\x80\x02garbage that is no pickle")
    with pytest.raises(CheckpointError) as unreadable:
        load_torch_file(path)
    # 103 is "g", the first byte the unpickler does not know
    assert str(unreadable.value) == (f"checkpoint file {path} is unreadable (UnpicklingError: Unsupported operand "
                                     f"103); it may be truncated or not a checkpoint")
