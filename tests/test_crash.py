"""kill -9 at random moments during saves and uploads to S3: every resume starts from a complete checkpoint, none
loads a partial one, and the finished run equals an uninterrupted one (more kills: bench/crash.py)."""

import pytest
import torch

from tarflow_testing.checkpoint_helpers import model_state
from tarflow_testing.crash_harness import final_losses, run_with_kills
from tarflow_testing.runs import free_port


@pytest.mark.alone  # kills aimed at sub-second windows: see tests/conftest.py
def test_kill_9_during_saves_never_resumes_from_a_partial_checkpoint(tmp_path, s3_bucket, fault_proxy):
    # Every PUT is slowed down, so that with a checkpoint every step a kill almost always lands mid-upload.
    fault_proxy.delay_next(10**9, seconds=0.05, method="PUT")
    steps = 60
    # (the attempt after the last kill runs to the end at full speed: no kill can land in it)
    killed = run_with_kills(tmp_path / "killed", f"s3://{s3_bucket}/killed", steps, kills=3, nproc=1, seed=0,
                            window=(0.3, 2.0), free_port=free_port, before_last_attempt=fault_proxy.clear)
    resumed = [k["resumed_from"] for k in killed.kills]
    assert resumed[0] is None and all(r is not None for r in resumed[1:]), resumed
    assert resumed[1:] == sorted(resumed[1:]) and resumed[-1] < steps  # each attempt got further, none finished
    assert any(k.get("during_save") for k in killed.kills), killed.kills  # at least one kill hit a save in flight
    # The uninterrupted run: no kills, so neither slowed-down uploads nor a save every step (only the final one is
    # compared; saving must not change training, and this way it is checked against a run that never saved)
    run_with_kills(tmp_path / "straight", f"s3://{s3_bucket}/straight", steps, kills=0, nproc=1, seed=0,
                   checkpoint_every=steps)
    a = model_state(f"s3://{s3_bucket}/straight")
    b = model_state(f"s3://{s3_bucket}/killed")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert final_losses(tmp_path / "killed") == final_losses(tmp_path / "straight")
    print("kills:", killed.kills)
