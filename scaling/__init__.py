"""Scaling studies: per-point results, power-law fits with bootstrap intervals, the compute frontier, and plots.

The fitting, table and plotting parts are plain numpy/scipy/matplotlib; ``scaling.plot`` imports matplotlib, so it is
not imported here.
"""

from .fit import Frontier, Points, ScalingFit, compute_frontier, fit_scaling_law
from .results import PointResult, format_table, markdown_table, read_csv, to_points, write_csv

__all__ = [
    "Frontier", "Points", "ScalingFit", "compute_frontier", "fit_scaling_law",
    "PointResult", "format_table", "markdown_table", "read_csv", "to_points", "write_csv",
]
