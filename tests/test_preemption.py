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
