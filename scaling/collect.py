"""A study's results: one ``PointResult`` per point, read from the points' run directories (and their FIDs)."""

from __future__ import annotations

from pathlib import Path

from .fid_eval import read_metrics
from .plan import Point
from .results import PointResult
from .rundir import finished, metrics_model_record, read_summary
from .spec import StudyError
from .state import StudyState


def collect_results(points: list[Point], state: StudyState, fid: bool = False) -> list[PointResult]:
    """One ``PointResult`` per point. Parameters and FLOPs per image come from the run's own metrics when it logged
    them (they must agree with the plan); training FLOPs = FLOPs per image × images seen (steps × global batch).
    With ``fid``, each finished point's sample metrics (FID, classifier metrics) from ``<point>/fid/`` (its
    evaluation's error when it failed)."""
    results = []
    for p in points:
        st = state[p.name]
        run_dir = Path(p.run_dir)
        summary = read_summary(run_dir) or {}
        done = not p.error and finished(p)
        logged = metrics_model_record(run_dir)
        params = int(logged.get("model/parameters", p.params_total))
        fpi = int(logged.get("model/train_flops_per_image", p.flops_per_image))
        if done and (params != p.params_total or fpi != p.flops_per_image):
            raise StudyError(f"{p.name}: the run logged {params} parameters and {fpi} FLOPs per image, the plan "
                             f"says {p.params_total} and {p.flops_per_image}: the run dir holds another model")
        step = int(summary.get("step", 0)) if done else p.steps
        images = step * p.global_batch
        wall = st.wall_seconds or float(summary.get("seconds", 0.0))
        if done:
            metrics = read_metrics(run_dir) if fid else {}
            results.append(PointResult(
                name=p.name, params_total=p.params_total, params_no_embed=p.params_no_embed,
                train_flops=float(fpi) * images, train_steps=step, images_seen=images, seed=p.seed,
                bits_per_dim=float(summary["final_bits_per_dim"]), wall_seconds=wall, status="ok",
                attempts=max(st.attempts, 1), grid=dict(p.grid), error=st.fid_error if fid and not metrics else "",
                weights=str(summary.get("weights", "raw")), **metrics))
        elif st.status == "failed" or p.error:
            results.append(PointResult(
                name=p.name, params_total=p.params_total, params_no_embed=p.params_no_embed,
                train_flops=float(fpi) * images, train_steps=p.steps, images_seen=images, seed=p.seed,
                bits_per_dim=None, wall_seconds=wall, status="failed", attempts=st.attempts,
                error=st.error or p.error, grid=dict(p.grid)))
    return results


def pending(points: list[Point], state: StudyState) -> list[str]:
    """Points neither finished nor failed (not run yet, interrupted, or in flight on a cluster)."""
    return [p.name for p in points if not p.error and not finished(p) and state[p.name].status != "failed"]
