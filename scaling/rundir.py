"""Reading what a point's run left in its directory: the trainer's ``summary.json`` (the run contract of
``cluster.run_contract``), the cluster wrappers' attempt records, the logs; and writing the study's files
atomically. The local runner, the cluster backends, the FID evaluation and the result collection all read runs
through this module."""

from __future__ import annotations

import contextlib
import json
import math
import re
from datetime import datetime, timezone
from pathlib import Path

from cluster.run_contract import SUMMARY_FILE, read_summary

__all__ = ["ATTEMPTS_FILE", "LOG_FILE", "SUMMARY_FILE", "atomic_write", "error_line", "finished", "last_lines",
           "metrics_model_record", "read_attempts", "read_from", "read_summary", "utc_now"]

LOG_FILE = "train.log"           # the local runner's capture of each attempt, appended
ATTEMPTS_FILE = "attempts.jsonl"  # cluster attempts, written by scaling.array_task
TAIL_LINES = 20


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def finished(point) -> bool:
    """The run reached its final step, was not preempted, and evaluated a finite held-out bits/dim."""
    s = read_summary(point.run_dir)
    if not s or s.get("preempted") or int(s.get("step", -1)) < point.steps:
        return False
    bpd = s.get("final_bits_per_dim")
    return isinstance(bpd, (int, float)) and math.isfinite(bpd)


def error_line(tail: str) -> str:
    """The most telling line of a failed run's output: the trainer's "error:" line or the exception, else the
    last line."""
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    for pattern in (r"\berror: ", r"^[A-Za-z_.]*(Error|Exception)\b", r"(?i)error|killed|oom"):
        hits = [line for line in lines if re.search(pattern, line)]
        if hits:
            return hits[-1][:500]
    return lines[-1][:500] if lines else "no output"


def last_lines(text: str, n: int = TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-n:])


def read_from(path: Path, offset: int) -> str:
    """A log's text from ``offset`` on (what one attempt appended); "" when it cannot be read."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def read_attempts(run_dir: str | Path) -> list[dict]:
    """The attempt records a cluster wrapper appended to ``<run dir>/attempts.jsonl``."""
    path = Path(run_dir) / ATTEMPTS_FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


def metrics_model_record(run_dir: Path) -> dict:
    """The trainer's ``model/parameters`` and ``model/train_flops_per_image`` (logged once per attempt)."""
    path = Path(run_dir) / "metrics.jsonl"
    found: dict = {}
    if not path.is_file():
        return found
    for line in path.read_text().splitlines():
        if '"model/' not in line:
            continue
        with contextlib.suppress(ValueError):
            rec = json.loads(line)
            found.update({k: v for k, v in rec.items() if k.startswith("model/")})
    return found
