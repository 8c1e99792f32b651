"""The run contract: what a ``tarflow train`` run tells whoever launched it, defined once for the trainer (which
writes it), the cluster launchers and the scaling driver (which read it).

- **Exit status** ``PREEMPTION_EXIT_CODE`` (75, EX_TEMPFAIL: "try again later"): the run checkpointed because it
  was told to stop (a signal, or its own ``preemption.time_limit_minutes``); run it again and it resumes. Distinct
  from 1 (a Python error), 2 (bad usage), 128+N (killed by signal N) and 143 (SIGTERM's default). It is the default
  of the trainer's ``preemption.exit_code``.
- ``<run_dir>/preempted.json`` (``PREEMPTED_FILE``): written by rank 0 when the run stopped early: ``step``,
  ``reason``, ``checkpoint``, ``exit_code``. torchrun reports its ranks' codes as its own status 1, so launchers
  look for this file too; a launcher removes an earlier attempt's before it starts the next.
- ``<run_dir>/summary.json`` (``SUMMARY_FILE``): written by rank 0 at the end of every attempt: ``step``,
  ``final_bits_per_dim``, ``checkpoint``, ``preempted``, ``seconds``, ...
"""

from __future__ import annotations

import json
from pathlib import Path

PREEMPTION_EXIT_CODE = 75
# Exported to every task of a cluster job, so that code which cannot import this module still agrees on the number.
PREEMPTION_EXIT_CODE_ENV = "TARFLOW_PREEMPTION_EXIT_CODE"
PREEMPTED_FILE = "preempted.json"
SUMMARY_FILE = "summary.json"


def preempted_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / PREEMPTED_FILE


def summary_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / SUMMARY_FILE


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_summary(run_dir: str | Path) -> dict | None:
    """The run's last ``summary.json``, or None when it has none (or an unreadable one)."""
    return _read_json(summary_path(run_dir))


def read_preempted(run_dir: str | Path) -> dict | None:
    """The run's ``preempted.json``, or None when the last attempt did not stop early (or has not said so yet)."""
    return _read_json(preempted_path(run_dir))
