"""The one error handler of the `tarflow` command: an expected error is one line and exit code 2 (a traceback only
with TARFLOW_DEBUG=1); a bug keeps its traceback."""

import pytest

from tarflow.main import USAGE_ERROR, main

TINY = ["model.channels=32", "model.head_dim=16", "model.num_blocks=2", "model.layers_per_block=1",
        "train.steps=3", "schedule.warmup_steps=0", "train.global_batch=16", "train.micro_batch=16",
        "eval.at_start=false", "logging.progress=false"]
# A learning rate that overflows the weights in its first step: the second step's loss is not finite.
DIVERGING = ["optim.lr=1e30", "optim.grad_clip=0", "train.max_nonfinite_steps=1"]


def test_a_diverged_run_stops_with_one_line_and_no_checkpoint(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TARFLOW_DEBUG", raising=False)
    run_dir = tmp_path / "run"
    assert main(["train", f"train.run_dir={run_dir}", *TINY, *DIVERGING]) == USAGE_ERROR == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        "tarflow train: error: 1 consecutive steps had a NaN/Inf loss or gradient (step 2); stopping without a "
        f"checkpoint. Lower optim.lr, enable optim.grad_clip, or check the data. The last good checkpoint is in "
        f"{run_dir}/checkpoints.")
    assert "Traceback" not in err
    assert not list(run_dir.glob("checkpoints/step-*"))


@pytest.mark.parametrize("debug, traceback", [("1", True), ("0", False), ("", False)])
def test_tarflow_debug_shows_the_traceback_of_an_expected_error(tmp_path, capsys, monkeypatch, debug, traceback):
    monkeypatch.setenv("TARFLOW_DEBUG", debug)
    assert main(["train", f"train.run_dir={tmp_path}", "train.stepz=3"]) == 2
    err = capsys.readouterr().err
    assert err.endswith("tarflow train: error: unknown config key 'train.stepz' (from command line); did you mean "
                        "'train.steps'?\n")
    assert ("Traceback (most recent call last)" in err) is traceback
    assert not any(tmp_path.iterdir())


def test_a_bug_is_not_dressed_as_a_user_error(monkeypatch):
    import tarflow.data

    def broken(args):
        raise KeyError("a bug")

    monkeypatch.setattr(tarflow.data, "write", broken)
    with pytest.raises(KeyError):
        main(["data", "write", "--source", "digits", "--format", "mds", "--out", "/nonexistent"])


def test_a_batch_that_does_not_split_over_the_launch_names_its_size(tmp_path, capsys, monkeypatch):
    """As under `torchrun --nproc_per_node=3`: the config is validated for the launch's 3 ranks, before anything."""
    for key, value in {"RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "3",
                       "TORCHELASTIC_RUN_ID": "test"}.items():
        monkeypatch.setenv(key, value)
    run_dir = tmp_path / "run"
    code = main(["train", f"train.run_dir={run_dir}", "train.strategy=ddp", "train.global_batch=32",
                 "train.micro_batch=32"])
    assert code == USAGE_ERROR
    assert capsys.readouterr().err.strip() == ("tarflow train: error: train.global_batch: 32 is not divisible by "
                                               "train.micro_batch × data-parallel size = 32 × 3 = 96")
    assert not run_dir.exists()
