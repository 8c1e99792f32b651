"""Scaling studies: per-point results, power-law fits with bootstrap intervals, the compute frontier, and plots; the
study driver (``scaling.cli``: ``tarflow scale run|fit|report``): the spec (``spec``, ``validate``), its ``plan``, the
``state`` file, the run-directory reader (``rundir``, ``collect``), the backends (``local``, ``slurm``, ``k8s``, with
``reconcile`` and ``array_task`` for the clusters) and the FID per point (``fid_eval``). The driver uses the trainer
through ``trainer.api`` and the launchers through ``cluster``.

The names below are imported on first use: ``scaling.cli`` is imported by ``tarflow``'s parser, which should not pay
for scipy. ``scaling.plot`` imports matplotlib and is not re-exported.
"""

from importlib import import_module

_EXPORTS = {
    "Frontier": "fit", "Points": "fit", "ScalingFit": "fit", "compute_frontier": "fit", "fit_scaling_law": "fit",
    "PointResult": "results", "format_table": "results", "markdown_table": "results", "read_csv": "results",
    "to_points": "results", "write_csv": "results", "GridRow": "results", "grid_summary": "results",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'scaling' has no attribute {name!r}")
