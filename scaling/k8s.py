"""The Kubernetes backend: one ``cluster.k8s`` job per unfinished point, rendered to ``<study dir>/k8s/<point>.yaml``
and, on request, applied; Kubernetes retries a failed pod itself."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from cluster.k8s import K8sJob, render, to_yaml
from cluster.k8s import apply as kubectl_apply

from .plan import Point
from .reconcile import reconcile_cluster, to_submit
from .rundir import atomic_write, utc_now
from .spec import StudyError
from .state import Log, StudyState


def k8s_job_name(study: str, point: str) -> str:
    stem = re.sub(r"[^a-z0-9-]+", "-", study.lower()).strip("-")[:26].rstrip("-") or "study"
    if not stem[0].isalpha():
        stem = "s" + stem[:25]
    return f"{stem}-{hashlib.sha1(point.encode()).hexdigest()[:8]}"


def k8s_jobs(points: list[Point], spec, directory: Path, config: str | None) -> list[tuple[Point, object]]:
    """A ``cluster.k8s.K8sJob`` per point; the point's run directory is ``run_root/points/<name>`` in the pods."""
    k = spec.run.k8s
    root = k.run_root.rstrip("/") or str(directory)
    config_text = Path(config).read_text() if config else None
    out = []
    for p in points:
        overrides = [a for a in p.argv[1 if config else 0:]
                     if not a.startswith(("train.run_dir=", "train.resume="))]
        job = K8sJob(name=k8s_job_name(spec.name, p.name), image=k.image, namespace=k.namespace, nodes=k.nodes,
                     gpus_per_node=k.gpus_per_node, nproc_per_node=k.nproc_per_node, cpu=k.cpu, memory=k.memory,
                     s3_secret=k.s3_secret, config_text=config_text, overrides=overrides,
                     run_dir=f"{root}/points/{p.name}",
                     checkpoint_uri=f"{k.checkpoint_prefix.rstrip('/')}/{p.name}" if k.checkpoint_prefix else None,
                     max_restarts=spec.run.max_retries, flavor=k.flavor, grace_s=k.grace_s, workdir=k.workdir,
                     env={"TARFLOW_SCALING_POINT": p.name})
        out.append((p, job))
    return out


def submit_k8s(points: list[Point], state: StudyState, spec, directory: Path, config: str | None, *,
               apply: bool = False, retry_failed: bool = False, config_text: str = "", log: Log = print) -> dict:
    """Render every unfinished point's manifests to ``<study dir>/k8s/<point>.yaml``; with ``apply``, kubectl apply
    them. Kubernetes retries a failed pod itself (``max_retries``)."""
    in_flight = set(reconcile_cluster(points, state, spec.run.max_retries, log))
    todo = to_submit(points, state, in_flight if apply else set(), spec.run.max_retries, retry_failed, config_text, log)
    out_dir = directory / "k8s"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for p, job in k8s_jobs(todo, spec, directory, config):
        objs = render(job)
        path = out_dir / f"{p.name}.yaml"
        atomic_write(path, to_yaml(objs))
        written.append(str(path))
        if apply:
            try:
                log(kubectl_apply(objs).rstrip())
            except RuntimeError as e:
                state.save()
                raise StudyError(str(e)) from None
            st = state[p.name]
            st.status, st.fingerprint = "submitted", p.fingerprint(config_text)
            st.job = {"kind": "k8s", "id": job.name, "submitted": utc_now()}
    state.save()
    if not apply and written:
        log(f"rendered {len(written)} job(s) to {out_dir}/ (apply them with `kubectl apply -f {out_dir}` or "
            f"`tarflow scale run ... --apply`)")
    return {"submitted": [p.name for p in todo] if apply else [], "manifests": written,
            "in_flight": sorted(in_flight)}
