"""Fitting a study's results and reporting them: ``fit.json``, log-log plots, the table and the fitted laws.

What is fitted depends on what the study varied:

- sizes only: L(N) over all points;
- budgets only (one size): L(C) over all points, C = training FLOPs;
- both: L(N) for every budget that has at least 3 sizes, the compute frontier (best size per compute level) and L(C)
  on the frontier;
- a ``grid`` (e.g. ``train.noise_std``): the above within each combination of grid values (keys suffixed with it,
  "L(N) noise_std=0.1"), and in any case the held-out bits/dim (and FID) per grid value, mean and spread over seeds
  (``fit.json``'s ``grid``), plotted against the grid value (``grid_<key>.png``; log x when the values span more than
  10×). With one size and one budget only the latter is made.

N is ``fit.x`` of the study (parameters without embeddings by default). Fits and their bootstrap intervals come from
``scaling.fit``; a fit that cannot be made (fewer than 3 distinct x, say) is listed under ``skipped`` with the reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .fit import Points, ScalingFit, compute_frontier, fit_scaling_law
from .results import (
    PLUMBING_NOTE,
    PointResult,
    format_grid_summary,
    format_table,
    grid_keys,
    grid_summary,
    markdown_table,
    read_csv,
    sample_metrics,
    short_names,
    to_points,
    write_csv,
)

RESULTS_FILE = "results.csv"
FIT_FILE = "fit.json"
PLOTS_DIR = "plots"
X_LABELS = {"params_no_embed": "parameters without embeddings N", "params_total": "parameters N"}


def _plot_name(key: str) -> str:
    """"L(N)" → L_N.png, "L(N) steps400" → L_N_steps400.png."""
    stem = key.replace("(", "_").replace(")", "").replace(" ", "_")
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in stem) + ".png"


def monotone(points: Points) -> bool:
    """Mean bits/dim per x strictly decreases as x grows."""
    xs = np.unique(points.x)
    means = [points.loss[points.x == v].mean() for v in xs]
    return bool(all(b < a for a, b in zip(means, means[1:])))


def fit_study(name: str, results: list[PointResult], budget_of: dict[str, str], directory: Path, *,
              x: str = "params_no_embed", n_boot: int = 1000, confidence: float = 0.95, seed: int = 0,
              plots_dirs: tuple[Path, ...] = (), size_of: dict[str, str] | None = None) -> dict:
    """Fit what the study varied, write ``fit.json`` and the PNGs (into ``<directory>/plots`` and ``plots_dirs``)."""
    from .plot import plot_fit, plot_frontier, plot_grid

    ok = [r for r in results if r.ok]
    if not ok:
        raise ValueError("no finished points to fit (see `tarflow scale report` for failures)")
    out: dict = {"study": name, "x": x, "points": {"ok": len(ok), "failed": sum(r.status == "failed" for r in results)},
                 "fits": {}, "skipped": {}, "plots": []}
    dirs = [directory / PLOTS_DIR, *plots_dirs]
    kw = dict(n_boot=n_boot, confidence=confidence, seed=seed)

    def save(plotter, filename: str, *args, **kwargs) -> str:
        # <study dir>/plots/L_N.png; in a shared folder (docs/...) the study's name goes first: <name>_L_N.png
        paths = [str(plotter(*args, d / (filename if i == 0 else f"{name}_{filename}"), **kwargs))
                 for i, d in enumerate(dirs)]
        out["plots"] += paths
        return paths[0]

    keys = grid_keys(results)
    shorts = dict(zip(keys, short_names(keys)))
    groups: dict[tuple, list[PointResult]] = {}
    for r in ok:
        groups.setdefault(tuple((k, r.grid.get(k)) for k in keys), []).append(r)
    varied = False
    for combo, subset in groups.items():
        label = " ".join(f"{shorts[k]}={_value(v)}" for k, v in combo)
        varied |= _fit_group(name, subset, budget_of, x, kw, out, save, plot_fit, plot_frontier, label)
    if keys:
        rows = grid_summary(results, size_of, budget_of)
        out["grid"] = {"keys": keys, "rows": [r.to_dict() for r in rows]}
        plumbing = any(r.fid_plumbing for r in results)
        if plumbing:
            out["grid"]["fid_note"] = PLUMBING_NOTE
        axis = _plot_axis(keys, rows)
        short = shorts[axis]
        out["grid"]["plot"] = save(plot_grid, _plot_name(f"grid_{short}"), rows, axis, xlabel=short,
                                   title=f"{name}: held-out bits/dim" + (" and sample metrics" if any(
                                       r.metrics for r in rows) else "") + f" vs {short}",
                                   fid_note="plumbing only (random network)" if plumbing else "")
    elif not varied:
        out["skipped"]["L(N)"] = "the study has one size and one budget: nothing to fit"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / FIT_FILE).write_text(json.dumps(out, indent=2, allow_nan=False) + "\n")
    return out


def _value(v) -> str:
    from .results import format_grid_value

    return format_grid_value(v)


def _plot_axis(keys: list[str], rows) -> str:
    """The grid key to plot against: the first numeric one with several values, else the first with several."""
    def values(k):
        return {r.grid.get(k) for r in rows}

    numeric = [k for k in keys if len(values(k)) > 1 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                             for v in values(k))]
    several = [k for k in keys if len(values(k)) > 1]
    return (numeric or several or keys)[0]


def _fit_group(name: str, ok: list[PointResult], budget_of: dict[str, str], x: str, kw: dict, out: dict, save,
               plot_fit, plot_frontier, label: str = "") -> bool:
    """L(N), L(C) or the frontier of one set of points (all of them, or one combination of grid values); False when
    they vary neither size nor budget."""
    suffix = f" {label}" if label else ""
    file_suffix = "_" + label.replace("=", "").replace(" ", "_") if label else ""
    where = f" ({label})" if label else ""
    budgets = sorted({budget_of.get(r.name, "") for r in ok}, key=lambda b: min(
        r.train_steps for r in ok if budget_of.get(r.name, "") == b))
    sizes = {r.params_total for r in ok}

    def fit_sizes(subset: list[PointResult], key: str, title: str) -> None:
        pts = to_points(subset, x)
        try:
            fit = fit_scaling_law(pts, what=x.replace("_", " "), **kw)
        except ValueError as e:
            out["skipped"][key] = str(e)
            return
        entry = fit.to_dict()
        entry.update(symbol="N", monotone=monotone(pts), law_text=fit.law("N"))
        entry["plot"] = save(plot_fit, _plot_name(key), pts, fit, xlabel=X_LABELS[x], title=title)
        out["fits"][key] = entry

    if len(sizes) >= 2:
        if len(budgets) == 1:
            fit_sizes(ok, f"L(N){suffix}", f"{name}: held-out bits/dim vs size ({budgets[0]}){where}")
        else:
            for b in budgets:
                fit_sizes([r for r in ok if budget_of.get(r.name) == b], f"L(N) {b}{suffix}",
                          f"{name}: vs size at {b}{where}")
    if len(budgets) >= 2:
        pts = to_points(ok, "train_flops")
        key = f"L(C){suffix}"
        if len(sizes) == 1:
            try:
                fit = fit_scaling_law(pts, what="compute", **kw)
                entry = fit.to_dict()
                entry.update(symbol="C", monotone=monotone(pts), law_text=fit.law("C"))
                entry["plot"] = save(plot_fit, f"L_C{file_suffix}.png", pts, fit,
                                     xlabel="training compute C (FLOPs)",
                                     title=f"{name}: held-out bits/dim vs compute{where}", symbol="C")
                out["fits"][key] = entry
            except ValueError as e:
                out["skipped"][key] = str(e)
        else:
            frontier = compute_frontier(pts)
            out["frontier" + (f" {label}" if label else "")] = frontier.to_dict()
            fit = None
            try:
                fit = fit_scaling_law(frontier.points, what="compute (frontier)", **kw)
                entry = fit.to_dict()
                entry.update(symbol="C", monotone=monotone(frontier.points), law_text=fit.law("C"),
                             on="compute-optimal frontier")
                out["fits"][key] = entry
            except ValueError as e:
                out["skipped"][key] = str(e)
            path = save(plot_frontier, f"frontier{file_suffix}.png", pts, frontier, fit,
                        title=f"{name}: held-out bits/dim vs compute, frontier{where}")
            if key in out["fits"]:
                out["fits"][key]["plot"] = path
    return len(sizes) >= 2 or len(budgets) >= 2


def laws_text(fit: dict) -> list[str]:
    lines = []
    for key, entry in fit.get("fits", {}).items():
        law = ScalingFit.from_dict(entry).law(entry.get("symbol", "N"))
        level = f"{100 * entry['confidence']:.0f}%"
        what = f"N = {fit.get('x')}" if entry.get("symbol") == "N" else "C = training FLOPs"
        extra = f", on the {entry['on']}" if entry.get("on") else ""
        trend = "" if entry.get("monotone") is None else (
            "; bits/dim decreases monotonically" if entry["monotone"] else "; NOT monotone in x")
        lines.append(f"{key}: {law}   ({what}{extra}; {level} bootstrap intervals from {entry['n_boot']} fits over "
                     f"{entry['n_points']} points; rms log-residual {entry['residual_rms']:.3g}{trend})")
    for key, why in fit.get("skipped", {}).items():
        lines.append(f"{key}: not fitted: {why}")
    return lines


def report_text(results: list[PointResult], fit: dict | None, pending: list[str] = (), markdown: bool = False,
                size_of: dict[str, str] | None = None, budget_of: dict[str, str] | None = None) -> str:
    parts = [markdown_table(results) if markdown else format_table(results)]
    summary = format_grid_summary(results, size_of, budget_of, markdown=markdown, notes=False)
    if summary:
        keys = short_names(grid_keys(results))
        parts.append(("**Per grid value**" if markdown else "Per grid value") +
                     f" ({', '.join(keys)}): held-out bits/dim" + (" and sample metrics" if sample_metrics(
                         results) else "") + ", mean ± standard deviation over seeds\n\n"
                     + summary)
    if pending:
        parts.append(f"{len(pending)} point(s) not finished yet: {', '.join(pending)}")
    if fit is None:
        parts.append("no fit yet: `tarflow scale fit STUDY_DIR`")
    else:
        laws = laws_text(fit)
        parts.append("\n".join(f"- {line}" for line in laws) if markdown else "\n".join(laws))
    return "\n\n".join(parts)


def write_results(results: list[PointResult], directory: Path) -> Path:
    path = directory / RESULTS_FILE
    write_csv(results, path)
    return path


def read_results(directory: Path) -> list[PointResult]:
    path = directory / RESULTS_FILE
    if not path.is_file():
        raise ValueError(f"{directory}: no {RESULTS_FILE}")
    return read_csv(path)
