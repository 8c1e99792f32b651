"""Log-log plots of a scaling study: data, fitted law and bootstrap band; and the compute frontier.

Figures are drawn on matplotlib's Agg canvas directly (``Figure`` + ``FigureCanvasAgg``), not through pyplot, so
nothing needs a display and nothing touches pyplot's global figure state or backend choice.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from .fit import Frontier, Points, ScalingFit
from .results import RAW, format_count

FIGSIZE = (6.4, 4.8)  # inches; at DPI this is 960 × 720 pixels
DPI = 150
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")


def _figure(figsize: tuple[float, float], dpi: int) -> tuple[Figure, object]:
    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.25)
    # Losses span about a decade, so the default y labels are mostly minor ticks in scientific form ("3×10^0").
    for formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        formatter(FuncFormatter(_plain))
    return fig, ax


def _plain(v: float, _pos=None) -> str:
    return f"{v:g}"


def _g(v: float) -> str:
    # mathtext for 3 significant figures; large exponents as ×10^k rather than "e+05".
    s = f"{v:.3g}"
    if "e" in s:
        mantissa, exp = s.split("e")
        return rf"{mantissa}\times10^{{{int(exp)}}}"
    return s


def law_label(fit: ScalingFit, symbol: str = "N") -> str:
    """``L = E + A·N^−α`` with values, and a second line with the intervals."""
    head = rf"$L = {_g(fit.E)} + {_g(fit.A)}\,{symbol}^{{-{fit.alpha:.3g}}}$"
    if not fit.intervals:
        return head
    level = f"{100 * fit.confidence:.0f}%"
    parts = [rf"{name} $\in [{_g(fit.intervals[key][0])}, {_g(fit.intervals[key][1])}]$"
             for key, name in (("E", "E"), ("A", "A"), ("alpha", r"$\alpha$"))]
    return head + f"\n{level} CI: " + ", ".join(parts)


def _draw_fit(ax, fit: ScalingFit, symbol: str, color: str = "C3") -> None:
    ax.fill_between(fit.band_x, fit.band_low, fit.band_high, color=color, alpha=0.2, linewidth=0,
                    label=f"{100 * fit.confidence:.0f}% bootstrap band ({fit.n_boot} fits)")
    ax.plot(fit.band_x, fit.predict(fit.band_x), color=color, linewidth=1.8, label=law_label(fit, symbol))


def plot_fit(points: Points, fit: ScalingFit, path: str | Path, xlabel: str = "parameters N", title: str = "", *,
             ylabel: str = "held-out bits/dim", symbol: str = "N", figsize: tuple[float, float] = FIGSIZE,
             dpi: int = DPI) -> Path:
    """Each seed's points (one marker per seed), the mean per x, the fitted law and its band; writes a PNG."""
    fig, ax = _figure(figsize, dpi)
    seeds = points.seed if points.seed is not None else np.zeros(len(points), dtype=int)
    for i, s in enumerate(np.unique(seeds)):
        mine = seeds == s
        ax.scatter(points.x[mine], points.loss[mine], marker=_MARKERS[i % len(_MARKERS)], s=22, alpha=0.55,
                   color="C0", label=f"seed {s}")
    xs = np.unique(points.x)
    means = np.array([points.loss[points.x == v].mean() for v in xs])
    ax.plot(xs, means, "o", color="black", markersize=5, markerfacecolor="none", label="mean per " + symbol)
    _draw_fit(ax, fit, symbol)
    return _label_and_save(fig, ax, path, xlabel, ylabel, title, legend_size=7)


def plot_frontier(points: Points, frontier: Frontier, fit: ScalingFit | None, path: str | Path,
                  xlabel: str = "training compute C (FLOPs)", title: str = "", *, ylabel: str = "held-out bits/dim",
                  figsize: tuple[float, float] = FIGSIZE, dpi: int = DPI) -> Path:
    """Loss against compute for every model size (one line per size), the frontier points labelled with the size
    that achieves them, and the law fitted on the frontier (if any); writes a PNG."""
    if points.size is None:
        raise ValueError("plot_frontier needs the model size of each point (Points.size)")
    fig, ax = _figure(figsize, dpi)
    sizes = np.unique(points.size)
    colors = colormaps["viridis"](np.linspace(0.05, 0.9, len(sizes)))
    for n, color in zip(sizes, colors):
        mine = points.size == n
        ax.scatter(points.x[mine], points.loss[mine], s=14, alpha=0.5, color=color)
        cs = np.unique(points.x[mine])
        ax.plot(cs, [points.loss[mine & (points.x == c)].mean() for c in cs], color=color, linewidth=1,
                label=f"N = {format_count(n)}")
    ax.plot(frontier.compute, frontier.loss, "*", color="C3", markersize=11, markeredgecolor="black",
            markeredgewidth=0.5, label="frontier (best per compute)", zorder=5)
    for c, l, n in zip(frontier.compute, frontier.loss, frontier.size):
        ax.annotate(format_count(n), (c, l), textcoords="offset points", xytext=(4, -10), fontsize=6)
    if fit is not None:
        _draw_fit(ax, fit, "C")
    return _label_and_save(fig, ax, path, xlabel, ylabel, title, legend_size=6)


def _label_and_save(fig: Figure, ax, path: str | Path, xlabel: str, ylabel: str, title: str,
                    legend_size: float) -> Path:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=legend_size, loc="upper right")
    return _save(fig, path)


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    # No bbox_inches="tight": the PNG keeps exactly figsize × dpi pixels, which the README layout relies on.
    fig.savefig(path, format="png")
    return path


# The sample metrics plot_grid draws, each in a panel of its own when any row has it (the tables have them all).
GRID_PANELS = (("fid", "FID"), ("class_accuracy", "class accuracy of samples"),
               ("classifier_fd", "classifier-feature FD (vs held-out)"))


def grid_panels(rows, fid_note: str = "") -> list[tuple[str, str]]:
    """(field, y label) of each panel of ``plot_grid``: bits/dim, then each of ``GRID_PANELS`` some row has."""
    panels = [("bits_per_dim", "held-out bits/dim")]
    for metric, label in GRID_PANELS:
        if any(r.metric(metric)[0] is not None for r in rows):
            panels.append((metric, label + (f"\n({fid_note})" if fid_note and metric == "fid" else "")))
    return panels


def plot_grid(rows, key: str, path: str | Path, xlabel: str = "", title: str = "", *, fid_note: str = "",
              figsize: tuple[float, float] | None = None, dpi: int = DPI) -> Path:
    """Held-out bits/dim, and FID, class accuracy and classifier FD (a panel each, when any row has it) against the
    grid value of ``key``: the mean over seeds with an error bar of ± one standard deviation, one line per (size,
    budget, other grid values), dashed without the denoising step (``fid.denoise: both``). ``rows`` are
    ``scaling.results.GridRow``. Numeric values on a log axis when they span more than 10×; other values (strings,
    booleans) as categories in the order given. Writes a PNG."""
    values = list(dict.fromkeys(r.grid.get(key) for r in rows))
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if numeric:
        values = sorted(values)
        position = {v: float(v) for v in values}
        log_x = min(values) > 0 and max(values) / min(values) > 10
    else:
        position = {v: float(i) for i, v in enumerate(values)}
        log_x = False
    panels = grid_panels(rows, fid_note)
    if figsize is None:
        figsize = (FIGSIZE[0] * (1 if len(panels) == 1 else 0.85 * len(panels)), FIGSIZE[1] * 0.85)
    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    series: dict[tuple, list] = {}
    for r in rows:
        other = tuple((k, v) for k, v in r.grid.items() if k != key)
        series.setdefault((r.size, r.budget, other), []).append(r)
    sizes = len({s[0] for s in series}) > 1
    budgets = len({s[1] for s in series}) > 1

    def value_of(r, field: str) -> tuple:
        if field == "bits_per_dim":
            return r.bits_per_dim, r.bits_per_dim_std, len(r.seeds)
        return r.metric(field)

    for i, (field, ylabel) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        if log_x:
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(FuncFormatter(_plain))
        variants = [(field, "o-", "")] + ([(field + RAW, "s--", ", no denoise")] if field != "bits_per_dim" else [])
        for j, ((size, budget, other), rs) in enumerate(series.items()):
            rs = sorted(rs, key=lambda r: position[r.grid.get(key)])
            for name, fmt, suffix in variants:
                pts = [(position[r.grid.get(key)], *value_of(r, name)) for r in rs]
                pts = [p for p in pts if p[1] is not None]
                if not pts:
                    continue
                xs, ys, sd, n = zip(*pts)
                label = ", ".join([*([f"N = {format_count(rs[0].params_total)}"] if sizes else []),
                                   *([budget] if budgets else []),
                                   *[f"{k.rsplit('.', 1)[-1]}={v}" for k, v in other]])
                seeds = max(n)
                label = (label + ", " if label else "") + f"mean of {seeds} seed{'s' if seeds > 1 else ''}"
                ax.errorbar(xs, ys, yerr=[0.0 if s is None else s for s in sd], fmt=fmt, color=f"C{j % 10}",
                            capsize=3, markersize=4, linewidth=1.2,
                            label=label + (" ± sd" if seeds > 1 else "") + suffix)
        if not numeric:
            ax.set_xticks([position[v] for v in values], [str(v) for v in values])
        else:
            ax.set_xticks(values, [_plain(v) for v in values])
            ax.minorticks_off()
        ax.set_xlabel(xlabel or key)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)
