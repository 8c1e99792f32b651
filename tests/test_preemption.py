"""The preemption guard: signals only set a flag (the first one wins), the time limit trips it too, and the
previous handlers come back when the run ends."""

import os
import signal
import time

import pytest
import torch

from trainer.preemption import PreemptionGuard


def test_a_signal_sets_the_flag_and_a_second_changes_nothing():
    guard = PreemptionGuard(["SIGTERM", "SIGUSR1"])
    try:
        assert guard.requested(torch.device("cpu")) is None
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # the process is still alive: the handler only records
        assert guard.requested(torch.device("cpu")) == "SIGUSR1"
    finally:
        guard.close()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_the_time_limit_trips_the_same_flag():
    guard = PreemptionGuard([], time_limit_seconds=0.2)
    assert guard.requested(torch.device("cpu")) is None
    time.sleep(0.25)
    assert guard.requested(torch.device("cpu")) == "time limit of 0.2 s"
    guard.close()


def test_unknown_signal_names_are_config_errors():
    with pytest.raises(ValueError, match=r"preemption.signals: 'SIGFOO' is not a signal name"):
        PreemptionGuard(["SIGFOO"])


def _agree(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    guard = PreemptionGuard(["SIGUSR1"])
    try:
        before = guard.requested(torch.device("cpu"))
        if rank == 1:  # the signal reaches one rank only (SLURM forwards it node by node)
            os.kill(os.getpid(), signal.SIGUSR1)
        after = guard.requested(torch.device("cpu"))
    finally:
        guard.close()
        dist.destroy_process_group()
    with open(f"{out}.{rank}", "w") as f:
        f.write(f"{before} {after}")


def test_every_rank_records_the_signal_another_rank_received(tmp_path):
    """Two gloo processes: SIGUSR1 on rank 1 only; both stop at the same boundary, both saying SIGUSR1 (rank 0
    writes preempted.json, so its reason is the run's record)."""
    import torch.multiprocessing as mp

    mp.start_processes(_agree, args=(str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2, start_method="spawn")
    assert [(tmp_path / f"out.{r}").read_text() for r in (0, 1)] == ["None SIGUSR1", "None SIGUSR1"]
