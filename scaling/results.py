"""Per-point results of a scaling study: the record, its CSV form, and text/markdown tables."""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .fit import Points

STATUSES = ("ok", "failed")


@dataclass
class PointResult:
    """One point of a study (one model size × budget × seed). ``bits_per_dim`` is the final held-out bits/dim, None
    for a failed point; ``attempts`` counts runs including retries; ``error`` is the last failure's message."""

    name: str
    params_total: int
    params_no_embed: int
    train_flops: float
    train_steps: int
    images_seen: int
    seed: int
    bits_per_dim: float | None
    wall_seconds: float
    status: str = "ok"
    attempts: int = 1
    error: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}; got {self.status!r}")

    @property
    def ok(self) -> bool:
        return self.status == "ok" and self.bits_per_dim is not None and math.isfinite(self.bits_per_dim)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PointResult:
        """Accepts both typed values and the strings a CSV reader gives back."""
        return cls(**{name: _CONVERT[name](d[name]) for name in _COLUMNS if name in d})


_COLUMNS = [f.name for f in fields(PointResult)]


def _int(v) -> int:
    return int(v)


def _float(v) -> float:
    return float(v)


def _optional_float(v) -> float | None:
    return None if v is None or v == "" else float(v)


_CONVERT = {
    "name": str, "params_total": _int, "params_no_embed": _int, "train_flops": _float, "train_steps": _int,
    "images_seen": _int, "seed": _int, "bits_per_dim": _optional_float, "wall_seconds": _float, "status": str,
    "attempts": _int, "error": lambda v: "" if v is None else str(v),
}


def write_csv(results: Iterable[PointResult], path: str | Path) -> None:
    """Floats are written with repr (shortest exact round-trip form), None as an empty cell."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=_COLUMNS)
        writer.writeheader()
        for r in results:
            row = r.to_dict()
            row = {k: ("" if v is None else repr(v) if isinstance(v, float) else v) for k, v in row.items()}
            writer.writerow(row)


def read_csv(path: str | Path) -> list[PointResult]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = set(_COLUMNS) - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: missing column(s) {sorted(missing)}")
        return [PointResult.from_dict(row) for row in reader]


def sort_key(r: PointResult) -> tuple:
    # By size, then budget (FLOPs; steps and images break ties between equal-FLOP budgets), then seed.
    return (r.params_total, r.train_flops, r.train_steps, r.images_seen, r.seed, r.name)


def to_points(results: Iterable[PointResult], x: str = "params_total") -> Points:
    """The successful points as (x, bits/dim) for fitting; ``x`` is a numeric field, e.g. "params_total",
    "params_no_embed" or "train_flops". Failed points are left out."""
    if x not in _CONVERT or x in ("name", "status", "error", "bits_per_dim"):
        raise ValueError(f"x must be a numeric field of PointResult; got {x!r}")
    ok = [r for r in results if r.ok]
    return Points(x=np.array([getattr(r, x) for r in ok], dtype=float),
                  loss=np.array([r.bits_per_dim for r in ok], dtype=float),
                  seed=np.array([r.seed for r in ok], dtype=int),
                  size=np.array([r.params_total for r in ok], dtype=float))


def format_count(v: float) -> str:
    """A count in 3 significant figures with an SI suffix: 1.23M, 45.6k."""
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= factor:
            return f"{v / factor:.3g}{suffix}"
    return f"{v:.3g}"


def _wall(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


_HEADERS = ("point", "params", "non-emb", "FLOPs", "steps", "images", "seed", "bits/dim", "wall", "status", "tries")


def _rows(results: Sequence[PointResult]) -> list[tuple[str, ...]]:
    rows = []
    for r in sorted(results, key=sort_key):
        bpd = f"{r.bits_per_dim:.4f}" if r.ok else "—"
        rows.append((r.name, format_count(r.params_total), format_count(r.params_no_embed), f"{r.train_flops:.3g}",
                     str(r.train_steps), format_count(r.images_seen), str(r.seed), bpd, _wall(r.wall_seconds),
                     r.status, str(r.attempts)))
    return rows


def _failures(results: Sequence[PointResult]) -> list[str]:
    return [f"{r.name}: failed after {r.attempts} attempt(s): {r.error.strip() or 'no message'}"
            for r in sorted(results, key=sort_key) if r.status == "failed"]


def format_table(results: Sequence[PointResult]) -> str:
    """A fixed-width text table, sorted by size, budget, seed; failed points' errors are listed below it."""
    rows = [_HEADERS] + _rows(results)
    widths = [max(len(row[i]) for row in rows) for i in range(len(_HEADERS))]
    # The name column is left-aligned, the numbers right-aligned so that digits line up.
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    failures = _failures(results)
    if failures:
        lines += [""] + failures
    return "\n".join(lines)


def markdown_table(results: Sequence[PointResult]) -> str:
    """The same table as GitHub markdown, for the README."""
    def cell(s: str) -> str:
        return s.replace("|", "\\|")

    align = ["---" if h in ("point", "status") else "---:" for h in _HEADERS]
    lines = ["| " + " | ".join(_HEADERS) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in _rows(results)]
    failures = _failures(results)
    if failures:
        lines += [""] + [f"- {cell(' '.join(f.split()))}" for f in failures]
    return "\n".join(lines)
