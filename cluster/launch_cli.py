"""``tarflow launch slurm|k8s [CONFIG] [key=value ...]``: submit a self-resuming training run.

The config and overrides are passed through as text (cluster does not import trainer). The few settings the
launcher itself needs (train.run_dir: where the script and logs go; preemption.exit_code; checkpoint.uri) are read
from the overrides or with a plain YAML load. ``add_launch_parser`` adds the command to the ``tarflow`` parser, whose
root handles the errors and passes ``check_config``: the trainer's validation of the config for the launch's number of
processes, run before anything is rendered, written or submitted (a job that can only fail at start costs a queue
wait to learn so).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Callable

from .k8s import FLAVORS, K8sJob, apply, render, to_yaml
from .slurm import SlurmJob, submit

# (config file or None, overrides, nodes, processes per node) → None, or an error naming the flag or key to change
ConfigCheck = Callable[[str | None, list[str], int, int], None]


def _check(args: argparse.Namespace, config: str | None, overrides: list[str], nodes: int, nproc: int) -> None:
    if args.check_config is not None:
        args.check_config(config, overrides, nodes, nproc)


def _split_config_and_overrides(args: list[str]) -> tuple[str | None, list[str]]:
    """The first argument is a config file unless it is an override (the same rule as ``tarflow train``)."""
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


def _override(overrides: list[str], key: str) -> str | None:
    values = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].strip() == key]
    return values[-1] if values else None  # the last one wins, as in the trainer


def _setting(config: str | None, overrides: list[str], key: str) -> str | None:
    """A setting the launcher must know (the run dir, the preemption exit code): the last override, else the
    YAML's value. A plain load: the trainer validates the whole config when the job starts."""
    value = _override(overrides, key)
    if value is not None or not config:
        return value
    from omegaconf import OmegaConf

    if not Path(config).is_file():
        raise ValueError(f"config {config!r} not found")
    value = OmegaConf.select(OmegaConf.load(config), key, default=None)
    return None if value is None else str(value)


def _key_values(items: list[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{what} {item!r} is not KEY=VALUE")
        out[key] = value
    return out


def parse_toleration(text: str) -> dict[str, str]:
    """``KEY[=VALUE][:EFFECT]`` → a toleration (Equal with a value, Exists without)."""
    rest, _, effect = text.partition(":")
    key, sep, value = rest.partition("=")
    if not key:
        raise ValueError(f"toleration {text!r}: expected KEY[=VALUE][:EFFECT], e.g. nvidia.com/gpu:NoSchedule")
    tol = {"key": key, "operator": "Equal" if sep else "Exists"}
    if sep:
        tol["value"] = value
    if effect:
        if effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute"):
            raise ValueError(f"toleration {text!r}: effect must be NoSchedule, PreferNoSchedule or NoExecute")
        tol["effect"] = effect
    return tol


def cmd_launch_slurm(args: argparse.Namespace) -> int:
    config, overrides = _split_config_and_overrides(args.rest)
    run_dir = args.run_dir or _setting(config, overrides, "train.run_dir") or f"runs/{args.job_name}"
    exit_code = _setting(config, overrides, "preemption.exit_code")
    if exit_code is not None and not exit_code.isdigit():
        raise ValueError(f"preemption.exit_code={exit_code!r} is not an integer")
    spec = SlurmJob(run_dir=run_dir, config=config, overrides=overrides, nodes=args.nodes,
                    gpus_per_node=args.gpus_per_node, nproc_per_node=args.nproc_per_node,
                    cpus_per_task=args.cpus_per_task, time=args.time, partition=args.partition,
                    account=args.account, signal_grace_s=args.signal_grace, max_restarts=args.max_restarts,
                    job_name=args.job_name, extra_sbatch=args.sbatch,
                    **({"preemption_exit_code": int(exit_code)} if exit_code is not None else {}))
    _check(args, config, overrides, spec.nodes, spec.nproc_per_node)
    try:
        sub = submit(spec, dry_run=args.dry_run)
    except RuntimeError as e:
        print(f"tarflow launch slurm: error: {e}", file=sys.stderr)
        return 1
    if args.dry_run:
        print(sub.text, end="")
        print(f"# dry run: nothing written or submitted; a real run writes {sub.script}", file=sys.stderr)
        return 0
    print(f"submitted job {sub.job_id}: {sub.script}")
    print(f"logs: {sub.stdout} and {sub.stderr} (requeued attempts append); outputs: {spec.slurm_dir.parent}")
    return 0


def _default_k8s_name(config: str | None) -> str:
    stem = Path(config).stem if config else "digits"
    name = re.sub(r"[^a-z0-9-]+", "-", f"tarflow-{stem}".lower()).strip("-")
    return name[:40].rstrip("-")


def cmd_launch_k8s(args: argparse.Namespace) -> int:
    config, overrides = _split_config_and_overrides(args.rest)
    # a local config travels in a ConfigMap; a path that is not here is taken as a path inside the image
    local_config = config if config and Path(config).is_file() else None
    spec = K8sJob(name=args.name or _default_k8s_name(config), image=args.image, namespace=args.namespace,
                  nodes=args.nodes, gpus_per_node=args.gpus_per_node, nproc_per_node=args.nproc_per_node,
                  cpu=args.cpu, memory=args.memory, node_selector=_key_values(args.node_selector, "node selector"),
                  tolerations=[parse_toleration(t) for t in args.toleration], s3_secret=args.s3_secret,
                  config=None if local_config else config,
                  config_text=Path(local_config).read_text() if local_config else None,
                  overrides=overrides, run_dir=args.run_dir, checkpoint_uri=args.checkpoint_uri,
                  max_restarts=args.max_restarts, flavor=args.flavor, grace_s=args.grace, workdir=args.workdir)
    if config and not local_config:  # a path inside the image: only the job can read it
        print(f"# note: {config} is not here, so the config is checked only when the job starts", file=sys.stderr)
    else:
        _check(args, local_config, overrides, spec.nodes, spec.nproc_per_node)
    objs = render(spec)
    uri = args.checkpoint_uri or _setting(local_config, overrides, "checkpoint.uri")
    if not (uri or "").startswith("s3://"):
        print("# note: checkpoints survive a pod's restart only outside it: --checkpoint-uri s3://bucket/prefix",
              file=sys.stderr)
    if not args.apply:
        print(to_yaml(objs), end="")
        return 0
    try:
        print(apply(objs), end="")
    except RuntimeError as e:
        print(f"tarflow launch k8s: error: {e}", file=sys.stderr)
        return 1
    print(f"logs: kubectl logs -n {spec.namespace} -l app.kubernetes.io/instance={spec.name} --prefix -f")
    return 0


def add_launch_parser(subparsers: argparse._SubParsersAction, check_config: ConfigCheck | None = None) -> None:
    p = subparsers.add_parser("launch", help="submit a self-resuming training run to SLURM or Kubernetes")
    p.set_defaults(check_config=check_config)
    targets = p.add_subparsers(dest="launch_target", required=True)

    s = targets.add_parser("slurm", help="render an sbatch script, write it under the run dir, submit it",
                           description="tarflow launch slurm [CONFIG.yaml] [key=value ...] --nodes N ...")
    s.add_argument("rest", nargs="*", metavar="[CONFIG] [key=value ...]")
    s.add_argument("--nodes", type=int, default=1)
    s.add_argument("--gpus-per-node", type=int, default=0)
    s.add_argument("--nproc-per-node", type=int, help="trainer processes per node (default: GPUs, or 1)")
    s.add_argument("--cpus-per-task", type=int, help="CPUs per node for torchrun and its ranks")
    s.add_argument("--time", default="01:00:00", help="time limit, e.g. 4:00:00 or 1-00:00:00")
    s.add_argument("--partition")
    s.add_argument("--account")
    s.add_argument("--signal-grace", type=int, default=120, metavar="S",
                   help="USR1 this many seconds before the time limit: checkpoint, exit, requeue")
    s.add_argument("--max-restarts", type=int, default=3, help="requeues after preemption")
    s.add_argument("--run-dir", help="default: train.run_dir of the overrides or the config")
    s.add_argument("--job-name", default="tarflow")
    s.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="another #SBATCH option, e.g. --sbatch=--qos=high (repeatable)")
    s.add_argument("--dry-run", action="store_true", help="print the script; write and submit nothing")
    s.set_defaults(func=cmd_launch_slurm)

    k = targets.add_parser("k8s", help="render Kubernetes manifests (and kubectl apply them with --apply)",
                           description="tarflow launch k8s [CONFIG.yaml] [key=value ...] --image IMG ...")
    k.add_argument("rest", nargs="*", metavar="[CONFIG] [key=value ...]")
    k.add_argument("--image", required=True, help="a container image with this project installed")
    k.add_argument("--name", help="job name (default: tarflow-<config name>)")
    k.add_argument("--namespace", default="default")
    k.add_argument("--flavor", choices=FLAVORS, default="indexed-job")
    k.add_argument("--nodes", type=int, default=1)
    k.add_argument("--gpus-per-node", type=int, default=0)
    k.add_argument("--nproc-per-node", type=int)
    k.add_argument("--cpu", help="CPU request per pod, e.g. 16")
    k.add_argument("--memory", help="memory request and limit per pod, e.g. 128Gi")
    k.add_argument("--node-selector", action="append", default=[], metavar="KEY=VALUE")
    k.add_argument("--toleration", action="append", default=[], metavar="KEY[=VALUE][:EFFECT]")
    k.add_argument("--s3-secret", help="name of a Secret with the S3 credentials (its keys become variables)")
    k.add_argument("--run-dir", help="the run dir inside the pods (default: the config's train.run_dir)")
    k.add_argument("--checkpoint-uri", help="where checkpoints outlive the pods: s3://bucket/prefix (checkpoint.uri)")
    k.add_argument("--max-restarts", type=int, default=3, help="restarts after real failures")
    k.add_argument("--grace", type=int, default=120, metavar="S", help="SIGTERM → SIGKILL seconds on preemption")
    k.add_argument("--workdir", help="the container's working directory")
    mode = k.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the manifests (the default)")
    mode.add_argument("--apply", action="store_true", help="kubectl apply -f - the manifests")
    k.set_defaults(func=cmd_launch_k8s)
