"""Preemption: a signal (SIGTERM from Kubernetes or torchrun, SIGUSR1 from SLURM's ``--signal``) or the end of a
wall-clock budget sets a flag; at the next step boundary all ranks agree through one all-reduce, save, wait for the
upload and exit with a code that tells the scheduler to requeue. Nothing happens inside the signal handler but
setting the flag, so a second signal during the save changes nothing."""

from __future__ import annotations

import signal
import threading
import time

import torch

from .distributed import active


class PreemptionGuard:
    def __init__(self, signals: list[str], time_limit_seconds: float = 0.0):
        self.reason: str | None = None
        self.time_limit = time_limit_seconds
        self.started = time.monotonic()
        self._previous: dict[int, object] = {}
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread (e.g. tests driving a Trainer)
        for name in signals:
            number = getattr(signal, name, None)
            if not isinstance(number, signal.Signals):
                raise ValueError(f"preemption.signals: {name!r} is not a signal name (e.g. SIGTERM, SIGUSR1)")
            self._previous[number] = signal.signal(number, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.reason is None:
            self.reason = signal.Signals(signum).name

    # What the all-reduce carries: 0 nothing, a signal's number, or this code for the time limit.
    _TIME_LIMIT = 1000

    def requested(self, device: torch.device) -> str | None:
        """Collective: why this run should stop now (on any rank), or None. Every rank answers with the same reason,
        the one some rank saw: a signal reaches the ranks of a job at slightly different moments (SLURM forwards it
        node by node), so a rank that has not seen it yet still records the signal that stopped the run."""
        if self.reason is None and self.time_limit and time.monotonic() - self.started >= self.time_limit:
            self.reason = f"time limit of {self.time_limit:g} s"
        if not active():
            return self.reason
        code = 0 if self.reason is None else getattr(signal.Signals, self.reason, self._TIME_LIMIT)
        flag = torch.tensor([float(code)], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        agreed = int(flag.item())
        if agreed:
            self.reason = f"time limit of {self.time_limit:g} s" if agreed == self._TIME_LIMIT \
                else signal.Signals(agreed).name
        return self.reason if agreed else None

    def close(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()
