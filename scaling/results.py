"""Per-point results of a scaling study: the record, its CSV form, and text/markdown tables.

CSV columns: the fixed fields of :class:`PointResult` (the sample metrics and ``fid_network`` optional: files
written before they existed still read), then one column per grid key of the study (``train.noise_std``: a dotted
config key; ``noise``: an axis of named sets, whose values are the sets' names).
"""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .fit import Points

STATUSES = ("ok", "failed")


@dataclass
class PointResult:
    """One point of a study (one model size × budget × grid values × seed). ``bits_per_dim`` is the final held-out
    bits/dim, None for a failed point; ``attempts`` counts runs including retries; ``error`` is the last failure's
    message (for a finished point whose FID evaluation failed: that). ``fid`` is the point's FID when the study
    asks for one, and ``fid_network`` the network it came from (``tiny-random...``: a random stand-in, not an FID);
    ``class_accuracy``, ``classifier_fd``, ``precision``, ``recall`` the offline classifier metrics when it asks;
    ``<metric>_raw`` the same metrics of the same draws without the denoising step (``fid.denoise: both``);
    ``weights`` whether they are of the run's weight average (``ema``) or its trained weights (``raw``);
    ``grid`` the study's grid values of this point (config key → value)."""

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
    fid: float | None = None
    fid_network: str = ""
    class_accuracy: float | None = None  # the classifier metrics (fid.metric: quality), when the study asks
    classifier_fd: float | None = None
    precision: float | None = None
    recall: float | None = None
    fid_raw: float | None = None         # without the denoising step (fid.denoise: both)
    class_accuracy_raw: float | None = None
    classifier_fd_raw: float | None = None
    precision_raw: float | None = None
    recall_raw: float | None = None
    weights: str = "raw"                 # which weights bits/dim and the sample metrics are of: ema | raw
    grid: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}; got {self.status!r}")

    @property
    def ok(self) -> bool:
        return self.status == "ok" and self.bits_per_dim is not None and math.isfinite(self.bits_per_dim)

    @property
    def fid_ok(self) -> bool:
        return self.ok and self.fid is not None and math.isfinite(self.fid)

    @property
    def fid_plumbing(self) -> bool:
        """The FID came from the random stand-in network (``--inception tiny-random``): plumbing, not a result."""
        return self.fid_network.startswith("tiny-random")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PointResult:
        """Accepts both typed values and the strings a CSV reader gives back; grid values either as ``grid`` or as
        the columns that are not fields (CSV: a config key, or the axis of named sets)."""
        grid = dict(d["grid"]) if isinstance(d.get("grid"), dict) else {
            k: parse_scalar(v) for k, v in d.items() if isinstance(k, str) and k not in _CONVERT}
        return cls(**{name: _CONVERT[name](d[name]) for name in _COLUMNS if name in d}, grid=grid)


_COLUMNS = [f.name for f in fields(PointResult) if f.name != "grid"]
# What a point's samples are scored by (``tarflow eval``'s result rows): the table formats and headers of each, and
# the same metric without the denoising step (``<metric>_raw``).
SAMPLE_METRICS = {"fid": (".4g", "FID"), "class_accuracy": (".3f", "class acc"), "classifier_fd": (".4g", "cls FD"),
                  "precision": (".3f", "precision"), "recall": (".3f", "recall")}
RAW = "_raw"
ALL_SAMPLE_METRICS = (*SAMPLE_METRICS, *(k + RAW for k in SAMPLE_METRICS))
_OPTIONAL = {"fid_network", "weights", *ALL_SAMPLE_METRICS}  # added later: older results.csv files lack them


def parse_scalar(v: Any) -> Any:
    """A grid value read back from CSV: int, float, bool or string (as written: ints without a point, floats with
    repr, booleans as true/false)."""
    if not isinstance(v, str):
        return v
    for kind in (int, float):
        try:
            return kind(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v.lower(), v)


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
    "fid_network": lambda v: "" if v is None else str(v), "weights": lambda v: str(v or "raw"),
    **{k: _optional_float for k in ALL_SAMPLE_METRICS},
}


def grid_keys(results: Iterable[PointResult]) -> list[str]:
    """The grid's config keys, in the order the results first name them."""
    return list(dict.fromkeys(k for r in results for k in r.grid))


def _cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(v) if isinstance(v, float) else v


def write_csv(results: Iterable[PointResult], path: str | Path) -> None:
    """Floats are written with repr (shortest exact round-trip form), None as an empty cell; a column per grid key."""
    results = list(results)
    keys = grid_keys(results)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=_COLUMNS + keys)
        writer.writeheader()
        for r in results:
            row = r.to_dict()
            grid = row.pop("grid")
            row.update({k: grid.get(k) for k in keys})
            writer.writerow({k: _cell(v) for k, v in row.items()})


def read_csv(path: str | Path) -> list[PointResult]:
    """Also files without the optional columns (``fid``, ``fid_network``: written before FID was recorded)."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = set(_COLUMNS) - _OPTIONAL - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: missing column(s) {sorted(missing)}")
        return [PointResult.from_dict({k: v for k, v in row.items() if not (k not in _CONVERT and v == "")})
                for row in reader]


def in_order(results: Iterable[PointResult]) -> list[PointResult]:
    """By size, then budget (FLOPs; steps and images break ties between equal-FLOP budgets), grid values, then seed.
    Numeric grid values in increasing order; other values (names, booleans) in the order the results first give them:
    the study's plan, which lists them as the grid does."""
    results = list(results)
    seen: dict[tuple, int] = {}
    for r in results:
        for k, v in r.grid.items():
            seen.setdefault((k, v), len(seen))

    def key(r: PointResult) -> tuple:
        grid = tuple((0, float(v)) if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, seen[k, v])
                     for k, v in r.grid.items())
        return r.params_total, r.train_flops, r.train_steps, r.images_seen, grid, r.seed, r.name

    return sorted(results, key=key)


def to_points(results: Iterable[PointResult], x: str = "params_total") -> Points:
    """The successful points as (x, bits/dim) for fitting; ``x`` is a numeric field, e.g. "params_total",
    "params_no_embed" or "train_flops". Failed points are left out."""
    if x not in _CONVERT or x in ("name", "status", "error", "bits_per_dim", "fid_network", *ALL_SAMPLE_METRICS):
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
PLUMBING_NOTE = ("FID: plumbing only (random network): `inception: tiny-random` is a random stand-in for the FID "
                 "Inception, so these are not FIDs; real FIDs need the FID Inception weights "
                 "(the paper convention: weights-inception-2015-12-05-6726825d.pth)")


def format_grid_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def short_names(keys: Sequence[str]) -> list[str]:
    """Column headers of grid keys: the last part (noise_std), or all of it when two keys end alike."""
    lasts = [k.rsplit(".", 1)[-1] for k in keys]
    return [last if lasts.count(last) == 1 else k for k, last in zip(keys, lasts)]


def has_fid(results: Sequence[PointResult]) -> bool:
    return any(r.fid is not None or r.fid_network for r in results)


def fid_header(results: Sequence[PointResult]) -> str:
    return "FID†" if any(r.fid_plumbing for r in results) else "FID"


def sample_metrics(results: Sequence[PointResult]) -> list[str]:
    """The sample metrics any point has (``fid`` also when only its network is known: a failed evaluation), in
    table order: each metric, then without the denoising step."""
    present = [k for k in ALL_SAMPLE_METRICS if any(getattr(r, k) is not None for r in results)]
    if has_fid(results) and "fid" not in present:
        present.insert(0, "fid")
    return present


def _base(key: str) -> str:
    """The metric a column measures (``fid_raw`` → ``fid``)."""
    return key[:-len(RAW)] if key.endswith(RAW) else key


def metric_header(key: str, results: Sequence[PointResult]) -> str:
    name = fid_header(results) if _base(key) == "fid" else SAMPLE_METRICS[_base(key)][1]
    return name + (", no denoise" if key.endswith(RAW) else "")


def format_metric(key: str, value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    return f"{value:{SAMPLE_METRICS[_base(key)][0]}}"


def _headers(results: Sequence[PointResult]) -> tuple[str, ...]:
    keys = grid_keys(results)
    h = list(_HEADERS)
    h[6:6] = short_names(keys)  # the grid values before the seed
    at = h.index("bits/dim") + 1
    h[at:at] = [metric_header(k, results) for k in sample_metrics(results)]
    return tuple(h)


def _rows(results: Sequence[PointResult]) -> list[tuple[str, ...]]:
    keys = grid_keys(results)
    metrics = sample_metrics(results)
    rows = []
    for r in in_order(results):
        bpd = f"{r.bits_per_dim:.4f}" if r.ok else "—"
        row = [r.name, format_count(r.params_total), format_count(r.params_no_embed), f"{r.train_flops:.3g}",
               str(r.train_steps), format_count(r.images_seen),
               *[format_grid_value(r.grid[k]) if k in r.grid else "" for k in keys], str(r.seed), bpd,
               *[format_metric(k, getattr(r, k) if r.ok else None) for k in metrics],
               _wall(r.wall_seconds), r.status, str(r.attempts)]
        rows.append(tuple(row))
    return rows


def _failures(results: Sequence[PointResult]) -> list[str]:
    out = []
    for r in in_order(results):
        if r.status == "failed":
            out.append(f"{r.name}: failed after {r.attempts} attempt(s): {r.error.strip() or 'no message'}")
        elif r.error:
            out.append(f"{r.name}: {r.error.strip()}")  # finished, but its FID evaluation failed
    return out


def _notes(results: Sequence[PointResult]) -> list[str]:
    return [f"† {PLUMBING_NOTE}"] if any(r.fid_plumbing for r in results) else []


def _text_table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    # The first column is left-aligned, the numbers right-aligned so that digits line up.
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|")


def _md_table(rows: list[tuple[str, ...]], left: Sequence[str] = ()) -> list[str]:
    headers = rows[0]
    align = ["---" if h in left else "---:" for h in headers]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows[1:]]
    return lines


def format_table(results: Sequence[PointResult]) -> str:
    """A fixed-width text table, sorted by size, budget, grid values, seed; failed points' errors are listed below
    it, and what the FID column is when it is not an FID."""
    lines = _text_table([_headers(results)] + _rows(results))
    extra = _failures(results) + _notes(results)
    if extra:
        lines += [""] + extra
    return "\n".join(lines)


def markdown_table(results: Sequence[PointResult]) -> str:
    """The same table as GitHub markdown, for the README."""
    lines = _md_table([_headers(results)] + _rows(results), left=("point", "status"))
    failures = _failures(results)
    if failures:
        lines += [""] + [f"- {_md_cell(' '.join(f.split()))}" for f in failures]
    notes = _notes(results)
    if notes:
        lines += [""] + notes
    return "\n".join(lines)


# ---------------------------------------------------------------- per grid value: means over seeds
@dataclass
class GridRow:
    """The points of one (size, budget, grid values) over their seeds: mean and spread (sample standard deviation
    over seeds, None with one seed; min and max) of bits/dim, and mean, standard deviation and count of each sample
    metric the points have (``metrics``: name → {"mean", "std", "n"})."""

    grid: dict
    size: str
    params_total: int
    budget: str
    seeds: list
    bits_per_dim: float | None
    bits_per_dim_std: float | None
    bits_per_dim_min: float | None
    bits_per_dim_max: float | None
    metrics: dict = field(default_factory=dict)
    failed: int = 0

    def metric(self, key: str) -> tuple[float | None, float | None, int]:
        m = self.metrics.get(key) or {}
        return m.get("mean"), m.get("std"), m.get("n", 0)

    @property
    def fid(self) -> float | None:
        return self.metric("fid")[0]

    @property
    def fid_std(self) -> float | None:
        return self.metric("fid")[1]

    @property
    def fid_n(self) -> int:
        return self.metric("fid")[2]

    def to_dict(self) -> dict:
        return asdict(self)


def _spread(values: list[float]) -> tuple[float | None, float | None, float | None, float | None]:
    if not values:
        return None, None, None, None
    a = np.asarray(values, dtype=float)
    std = float(a.std(ddof=1)) if len(a) > 1 else None
    return float(a.mean()), std, float(a.min()), float(a.max())


def grid_summary(results: Sequence[PointResult], size_of: dict[str, str] | None = None,
                 budget_of: dict[str, str] | None = None) -> list[GridRow]:
    """One row per (size, budget, grid values), in the results' order; seeds averaged."""
    groups: dict[tuple, list[PointResult]] = {}
    for r in in_order(results):
        size = (size_of or {}).get(r.name, format_count(r.params_total))
        budget = (budget_of or {}).get(r.name, f"steps{r.train_steps}")
        key = (size, r.params_total, budget, tuple(r.grid.items()))
        groups.setdefault(key, []).append(r)
    rows = []
    for (size, params, budget, grid), rs in groups.items():
        ok = [r for r in rs if r.ok]
        mean, std, lo, hi = _spread([r.bits_per_dim for r in ok])
        metrics = {}
        for k in ALL_SAMPLE_METRICS:
            values = [getattr(r, k) for r in ok if getattr(r, k) is not None and math.isfinite(getattr(r, k))]
            if values:
                m_mean, m_std, _, _ = _spread(values)
                metrics[k] = {"mean": m_mean, "std": m_std, "n": len(values)}
        rows.append(GridRow(grid=dict(grid), size=size, params_total=params, budget=budget,
                            seeds=[r.seed for r in ok], bits_per_dim=mean, bits_per_dim_std=std,
                            bits_per_dim_min=lo, bits_per_dim_max=hi, metrics=metrics, failed=len(rs) - len(ok)))
    return rows


def _pm(mean: float | None, std: float | None, digits: str) -> str:
    if mean is None:
        return "—"
    return f"{mean:{digits}}" + (f" ± {std:{digits}}" if std is not None else "")


def _summary_rows(rows: Sequence[GridRow], results: Sequence[PointResult]) -> list[tuple[str, ...]]:
    keys = list(dict.fromkeys(k for r in rows for k in r.grid))
    sizes = len({r.size for r in rows}) > 1
    budgets = len({r.budget for r in rows}) > 1
    metrics = sample_metrics(results)
    header = [*short_names(keys), *(["size"] if sizes else []), *(["budget"] if budgets else []), "seeds",
              "bits/dim (mean ± sd)", "min", "max", *[f"{metric_header(k, results)} (mean ± sd)" for k in metrics]]
    out = [tuple(header)]
    for r in rows:
        row = [*[format_grid_value(r.grid[k]) if k in r.grid else "" for k in keys], *([r.size] if sizes else []),
               *([r.budget] if budgets else []), str(len(r.seeds)) + (f" (+{r.failed} failed)" if r.failed else ""),
               _pm(r.bits_per_dim, r.bits_per_dim_std, ".4f"),
               "—" if r.bits_per_dim_min is None else f"{r.bits_per_dim_min:.4f}",
               "—" if r.bits_per_dim_max is None else f"{r.bits_per_dim_max:.4f}"]
        for k in metrics:
            mean, std, _ = r.metric(k)
            row.append(_pm(mean, std, SAMPLE_METRICS[_base(k)][0]))
        out.append(tuple(row))
    return out


def format_grid_summary(results: Sequence[PointResult], size_of: dict[str, str] | None = None,
                        budget_of: dict[str, str] | None = None, markdown: bool = False, notes: bool = True) -> str:
    """Held-out bits/dim (and each sample metric) per grid value, mean ± standard deviation over seeds; "" without a
    grid. ``notes``: say below it what a † FID column is (off when the per-point table above says it)."""
    if not grid_keys(results):
        return ""
    rows = _summary_rows(grid_summary(results, size_of, budget_of), results)
    lines = _md_table(rows) if markdown else _text_table(rows)
    extra = _notes(results) if notes else []
    return "\n".join(lines + ([""] + extra if extra else []))
