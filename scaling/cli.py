"""``tarflow scale run|fit|report``: run a scaling study, fit its laws, print its table.

``add_scale_parser(subparsers)`` adds the ``scale`` command to the ``tarflow`` parser (whose root handles the
errors). Heavy imports (torch, scipy, matplotlib) happen inside the commands, so adding the parser costs
``tarflow train`` nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _log(message: str) -> None:
    print(message, flush=True)


def _plan_table(points) -> str:
    from .results import format_count

    rows = [("point", "params", "non-emb", "steps", "images", "FLOPs", "note")]
    for p in points:
        rows.append((p.name, format_count(p.params_total), format_count(p.params_no_embed), str(p.steps),
                     format_count(p.images), f"{p.train_flops:.3g}", p.error[:100]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i in (0, 6) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     .rstrip() for r in rows)


def cmd_run(args: argparse.Namespace) -> int:
    from . import k8s, slurm
    from .local import run_local
    from .plan import plan_study, resolve_config_path, study_dir, write_plan
    from .state import StudyState, study_lock
    from .validate import load_study

    spec = load_study(args.study)
    if args.where:
        spec.run.where = args.where
    if args.max_retries is not None:
        spec.run.max_retries = args.max_retries
    for key in ("plots_dir", "markdown"):  # as given from here, wherever fit runs later
        value = getattr(spec.report, key)
        if value:
            setattr(spec.report, key, str(Path(value).resolve()))
    directory = study_dir(spec, args.dir)
    config = resolve_config_path(spec)
    points = plan_study(spec, directory)
    config_text = Path(config).read_text() if config else ""
    where = spec.run.where
    fid = None
    if spec.fid is not None:  # missing weights fail here, before anything trains
        from .fid_eval import prepare_fid

        fid = prepare_fid(spec, directory, config)
    if args.dry_run:
        print(f"study {spec.name} → {directory}: {len(points)} point(s), run {where}")
        print(_plan_table(points))
        if fid is not None:
            print(fid.describe())
        if where == "slurm":
            state = StudyState.load(directory)
            result = slurm.submit_slurm(points, state, spec, directory, max_retries=spec.run.max_retries,
                                         config_text=config_text, dry_run=True, log=lambda m: None)
            if result.get("script"):
                print("\n# the job array's batch script (dry run: nothing written or submitted)")
                print(result["script"], end="")
        elif where == "k8s":
            from cluster.k8s import render, to_yaml

            print("\n# the manifests of each point (dry run: nothing written or applied)")
            for _, job in k8s.k8s_jobs([p for p in points if not p.error], spec, directory, config):
                print(to_yaml(render(job)), end="---\n")
        return 0

    write_plan(directory, spec, points, config)
    interrupted = False
    with study_lock(directory):
        state = StudyState.load(directory)
        if fid is not None:
            from .fid_eval import catch_up, ensure_reference

            _log(fid.describe())
            ensure_reference(fid, log=_log)  # once per study; a failure stops it before anything trains
        if where == "local":
            summary = run_local(points, state, max_retries=spec.run.max_retries, config_text=config_text,
                                       retry_failed=args.retry_failed, log=_log, fid=fid)
            interrupted = summary.interrupted
            print(f"{len(points)} point(s): {len(summary.launched)} run now, {len(summary.skipped)} finished earlier "
                  f"(skipped), {len(summary.failed)} failed" +
                  (f", {len(summary.fid_failed)} FID evaluation(s) failed" if fid is not None else ""))
        else:
            busy: set[str] = set()
            if where == "slurm":
                if args.wait:
                    slurm.wait_slurm(points, state, spec, directory, max_retries=spec.run.max_retries,
                                      config_text=config_text, poll_s=args.poll, log=_log)
                else:
                    result = slurm.submit_slurm(points, state, spec, directory, max_retries=spec.run.max_retries,
                                                 retry_failed=args.retry_failed, config_text=config_text, log=_log)
                    busy = set(result["submitted"]) | set(result["in_flight"])
            else:
                result = k8s.submit_k8s(points, state, spec, directory, config, apply=args.apply,
                                           retry_failed=args.retry_failed, config_text=config_text, log=_log)
                busy = set(result["submitted"]) | set(result["in_flight"])
            if fid is not None:  # the finished points' FIDs, here
                catch_up(fid, points, state, log=_log, skip=busy)
        state.save()
    return _finish(directory, fit=not args.no_fit and not interrupted) or (130 if interrupted else 0)


class _Collected:
    """A study's results: fresh from the run directories when the directory has a plan, else from results.csv."""

    def __init__(self, name, results, budget_of, waiting, spec, size_of=None):
        self.name, self.results, self.budget_of, self.waiting, self.spec = name, results, budget_of, waiting, spec
        self.size_of = size_of


def _collect(directory: Path) -> _Collected:
    from .analysis import read_results, write_results
    from .collect import collect_results, pending
    from .plan import read_plan
    from .reconcile import merge_cluster_attempts
    from .state import StudyState

    directory = Path(directory)
    if not (directory / "plan.json").is_file():
        results = read_results(directory)
        return _Collected(directory.name, results, {r.name: f"steps{r.train_steps}" for r in results}, [], {})
    plan = read_plan(directory)
    points = plan["points"]
    state = StudyState.load(directory)
    for p in points:  # cluster attempts not merged yet (the state is not saved here: the driver merges for good)
        merge_cluster_attempts(p, state[p.name])
    results = collect_results(points, state, fid=bool(plan["spec"].get("fid")))
    write_results(results, directory)
    return _Collected(plan["study"], results, {p.name: p.budget for p in points}, pending(points, state),
                      plan["spec"], {p.name: p.size for p in points})


def _finish(directory: Path, fit: bool) -> int:
    """results.csv; the fit when every point is finished or failed; the report. 1 if a point (or its FID) failed."""
    from .analysis import report_text

    c = _collect(directory)
    print(f"\nresults: {directory / 'results.csv'}")
    fitted = None
    if fit and not c.waiting and any(r.ok for r in c.results):
        fitted = _fit(directory, c, {})
    elif fit and not c.waiting:
        print("no point finished: nothing to fit")
    elif c.waiting:
        print(f"{len(c.waiting)} point(s) still to finish: `tarflow scale run` again later (it skips finished points)")
    print()
    print(report_text(c.results, fitted, c.waiting, size_of=c.size_of, budget_of=c.budget_of))
    return 1 if any(r.status == "failed" or r.error for r in c.results) else 0


def _fit(directory: Path, c: _Collected, overrides: dict) -> dict:
    from .analysis import fit_study, report_text

    f = {**c.spec.get("fit", {}), **{k: v for k, v in overrides.items() if v is not None}}
    report = c.spec.get("report", {})
    extra = (Path(report["plots_dir"]),) if report.get("plots_dir") else ()
    fitted = fit_study(c.name, c.results, c.budget_of, directory, x=f.get("x", "params_no_embed"),
                       n_boot=int(f.get("n_boot", 1000)), confidence=float(f.get("confidence", 0.95)),
                       seed=int(f.get("seed", 0)), plots_dirs=extra, size_of=c.size_of)
    print(f"fit: {directory / 'fit.json'}; plots: {', '.join(fitted['plots']) or 'none'}")
    if report.get("markdown"):
        path = Path(report["markdown"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(report_text(c.results, fitted, markdown=True, size_of=c.size_of, budget_of=c.budget_of)
                        + "\n")
        print(f"markdown: {path}")
    return fitted


def cmd_fit(args: argparse.Namespace) -> int:
    from .analysis import format_grid_summary, laws_text

    directory = Path(args.study_dir)
    c = _collect(directory)
    if c.waiting:
        print(f"note: {len(c.waiting)} point(s) not finished yet; fitting the finished ones", file=sys.stderr)
    fitted = _fit(directory, c, {"x": args.x, "n_boot": args.n_boot, "confidence": args.confidence,
                                 "seed": args.seed})
    summary = format_grid_summary(c.results, c.size_of, c.budget_of)
    print("\n\n".join(part for part in ("\n".join(laws_text(fitted)), summary) if part))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .analysis import FIT_FILE, report_text

    directory = Path(args.study_dir)
    c = _collect(directory)
    path = directory / FIT_FILE
    fitted = json.loads(path.read_text()) if path.is_file() else None
    print(report_text(c.results, fitted, c.waiting, markdown=args.markdown, size_of=c.size_of,
                      budget_of=c.budget_of))
    return 0


def add_scale_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("scale", help="scaling studies: run a grid of sizes, budgets (and any config keys), "
                                            "fit L(N) and L(C), FID per point")
    sub = p.add_subparsers(dest="scale_command", required=True)

    r = sub.add_parser("run", help="run (or resume) a study: every unfinished point, then fit and report",
                       description="tarflow scale run STUDY.yaml: each point is a `tarflow train` run in "
                                   "<study dir>/points/<point>; finished points are skipped, interrupted ones resume, "
                                   "failed ones are retried up to run.max_retries")
    r.add_argument("study", help="the study file (see studies/)")
    r.add_argument("--dir", help="the study directory (default: the study's dir:, else runs/scaling/<name>)")
    r.add_argument("--where", choices=["local", "slurm", "k8s"], help="override the study's run.where")
    r.add_argument("--max-retries", type=int, help="override the study's run.max_retries")
    r.add_argument("--retry-failed", action="store_true", help="run points that used up their retries again")
    r.add_argument("--dry-run", action="store_true", help="print the plan (and the batch script or manifests); "
                                                          "run nothing")
    r.add_argument("--no-fit", action="store_true", help="do not fit after the run")
    r.add_argument("--wait", action="store_true", help="slurm: wait for the array and resubmit failed points")
    r.add_argument("--poll", type=float, default=15.0, help="slurm --wait: seconds between squeue polls")
    r.add_argument("--apply", action="store_true", help="k8s: kubectl apply the manifests (default: only write them)")
    r.set_defaults(func=cmd_run)

    f = sub.add_parser("fit", help="fit L(N) (and L(C), the frontier) with bootstrap intervals: fit.json, PNGs")
    f.add_argument("study_dir")
    f.add_argument("--x", choices=["params_no_embed", "params_total"], help="the size N (default: the study's)")
    f.add_argument("--n-boot", type=int, help="bootstrap replicates (default: the study's, 1000)")
    f.add_argument("--confidence", type=float)
    f.add_argument("--seed", type=int)
    f.set_defaults(func=cmd_fit)

    q = sub.add_parser("report", help="print the results table and the fitted laws")
    q.add_argument("study_dir")
    q.add_argument("--markdown", action="store_true", help="as GitHub markdown (the README's table)")
    q.set_defaults(func=cmd_report)
