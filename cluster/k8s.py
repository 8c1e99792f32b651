"""Render Kubernetes manifests that run ``tarflow train`` under torchrun on ``nodes`` pods, and apply them.

Three flavors of the same job:
- ``indexed-job`` (default; needs no operator): a batch/v1 Job with completionMode Indexed, one pod per node, and a
  headless Service as the pods' subdomain, so pod 0 is reachable as ``<name>-0.<name>`` for the c10d rendezvous.
- ``pytorchjob``: a Kubeflow PyTorchJob (training-operator) with a Master and Workers; the operator sets
  MASTER_ADDR/MASTER_PORT to the master pod.
- ``jobset``: a JobSet (jobset.x-k8s.io) with one replicated Job; a failed pod restarts the whole gang.

In every flavor a preempted pod comes back (podFailurePolicy / restart policy), and ``train.resume=auto`` continues
from the newest checkpoint, which must therefore live outside the pod (``checkpoint.uri=s3://...``). S3 credentials
come from a Secret by name (envFrom), never inline; GPUs are ``nvidia.com/gpu`` limits.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Any

import yaml

from .no_secrets import assert_no_secret_values
from .torchrun import tarflow_program, torchrun_command

FLAVORS = ("indexed-job", "pytorchjob", "jobset")
CONFIG_MOUNT = "/etc/tarflow"  # where a config shipped in a ConfigMap appears in the pod
# JobSet puts the restart attempt on every pod; the downward API hands it to cluster.env as TARFLOW_RESTART_COUNT
JOBSET_RESTART_ANNOTATION = "jobset.sigs.k8s.io/restart-attempt"
# DNS-1035 label (Services need it); short, because pod host names append "-<job>-<i>-<j>" and stay below 63
_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$")
Obj = dict[str, Any]


@dataclass
class K8sJob:
    name: str
    image: str
    namespace: str = "default"
    nodes: int = 1
    gpus_per_node: int = 0
    nproc_per_node: int | None = None         # default gpus_per_node, or 1 on CPU
    cpu: str | None = None                    # requests per pod, e.g. "16"
    memory: str | None = None                 # e.g. "128Gi" (also the limit: memory is not compressible)
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    s3_secret: str | None = None              # a Secret holding AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...
    config: str | None = None                 # a config path inside the image (ignored if config_text is given)
    config_text: str | None = None            # a local config's YAML, shipped in a ConfigMap
    overrides: list[str] = field(default_factory=list)
    run_dir: str | None = None                # the pod's local run dir; None: the config's train.run_dir
    checkpoint_uri: str | None = None         # s3://bucket/prefix: checkpoints that outlive the pods
    max_restarts: int = 3                     # restarts after real failures (preemptions do not count)
    flavor: str = "indexed-job"
    port: int = 29500                         # the c10d rendezvous port on pod 0
    grace_s: int = 120                        # SIGTERM → SIGKILL: time to finish a step and checkpoint
    shm: bool = True                          # a memory-backed /dev/shm (the container default, 64 MiB, is too small)
    workdir: str | None = None                # the container's working directory (where trainer imports from)
    python: str = "python"
    env: dict[str, str] = field(default_factory=dict)  # more plain variables; never credentials

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"name={self.name!r}: lowercase letters, digits and '-', starting with a letter, "
                             f"at most 40 characters")
        if self.flavor not in FLAVORS:
            raise ValueError(f"flavor={self.flavor!r}: choose one of {', '.join(FLAVORS)}")
        if self.nodes < 1:
            raise ValueError(f"nodes={self.nodes} must be >= 1")
        if self.gpus_per_node < 0 or self.max_restarts < 0 or self.grace_s < 0:
            raise ValueError("gpus_per_node, max_restarts and grace_s must be >= 0")
        if self.nproc_per_node is None:
            self.nproc_per_node = self.gpus_per_node or 1
        if self.nproc_per_node < 1:
            raise ValueError(f"nproc_per_node={self.nproc_per_node} must be >= 1")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port={self.port} is not a TCP port")

    @property
    def container_name(self) -> str:
        return "pytorch" if self.flavor == "pytorchjob" else "trainer"  # the operator looks for "pytorch"

    @property
    def labels(self) -> dict[str, str]:
        return {"app.kubernetes.io/name": "tarflow", "app.kubernetes.io/instance": self.name}

    def rendezvous_host(self) -> str | None:
        """Pod 0's DNS name, or None where the operator provides MASTER_ADDR."""
        if self.flavor == "indexed-job":
            return f"{self.name}-0.{self.name}"           # <job>-<index>.<subdomain>
        if self.flavor == "jobset":
            return f"{self.name}-trainer-0-0.{self.name}"  # <jobset>-<replicatedJob>-<job index>-<pod index>
        return None


def _command(spec: K8sJob) -> list[str]:
    config = f"{CONFIG_MOUNT}/config.yaml" if spec.config_text is not None else spec.config
    trainer = tarflow_program("train", *([config] if config else []), *spec.overrides, "train.resume=auto")
    if spec.run_dir:
        trainer.append(f"train.run_dir={spec.run_dir}")
    if spec.checkpoint_uri:
        trainer.append(f"checkpoint.uri={spec.checkpoint_uri}")
    # $(VAR) is expanded by the kubelet from the container's environment: no shell in between
    return torchrun_command(trainer, python=spec.python, nnodes=spec.nodes, nproc_per_node=spec.nproc_per_node,
                            rdzv_endpoint="$(MASTER_ADDR):$(MASTER_PORT)", rdzv_id="$(TARFLOW_JOB_ID)",
                            # Indexed Job: a lost pod comes back alone and the others let it rejoin; elsewhere the
                            # gang restarts
                            max_restarts=spec.max_restarts if spec.flavor == "indexed-job" else 0)


def _container(spec: K8sJob) -> Obj:
    env: list[Obj] = [{"name": "TARFLOW_JOB_ID", "value": spec.name},
                      {"name": "TARFLOW_NNODES", "value": str(spec.nodes)},
                      {"name": "TARFLOW_NPROC_PER_NODE", "value": str(spec.nproc_per_node)},
                      # torchrun waits this long for the ranks to checkpoint after SIGTERM before it kills them
                      {"name": "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "value": str(max(1, spec.grace_s - 5))}]
    host = spec.rendezvous_host()
    if host is not None:  # the PyTorchJob operator sets these itself
        env += [{"name": "MASTER_ADDR", "value": host}, {"name": "MASTER_PORT", "value": str(spec.port)}]
    if spec.flavor == "jobset":
        env.append({"name": "TARFLOW_RESTART_COUNT", "valueFrom": {"fieldRef": {
            "fieldPath": f"metadata.annotations['{JOBSET_RESTART_ANNOTATION}']"}}})
    env += [{"name": k, "value": v} for k, v in sorted(spec.env.items())]

    resources: Obj = {}
    requests = {k: v for k, v in (("cpu", spec.cpu), ("memory", spec.memory)) if v}
    limits: dict[str, Any] = {}
    if spec.memory:
        limits["memory"] = spec.memory
    if spec.gpus_per_node:
        limits["nvidia.com/gpu"] = str(spec.gpus_per_node)  # extended resource: the request defaults to the limit
    if requests:
        resources["requests"] = requests
    if limits:
        resources["limits"] = limits

    container: Obj = {"name": spec.container_name, "image": spec.image, "command": _command(spec), "env": env,
                      "ports": [{"name": "pytorchjob-port" if spec.flavor == "pytorchjob" else "rdzv",
                                 "containerPort": spec.port}]}
    if spec.s3_secret:
        container["envFrom"] = [{"secretRef": {"name": spec.s3_secret}}]  # by name: values never pass through here
    if resources:
        container["resources"] = resources
    if spec.workdir:
        container["workingDir"] = spec.workdir
    mounts = []
    if spec.shm:
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    if spec.config_text is not None:
        mounts.append({"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True})
    if mounts:
        container["volumeMounts"] = mounts
    return container


def _pod_template(spec: K8sJob, restart_policy: str, subdomain: str | None = None) -> Obj:
    pod: Obj = {"containers": [_container(spec)], "restartPolicy": restart_policy,
                "terminationGracePeriodSeconds": spec.grace_s}
    if subdomain:
        pod["subdomain"] = subdomain
    if spec.node_selector:
        pod["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod["tolerations"] = [dict(t) for t in spec.tolerations]
    volumes = []
    if spec.shm:
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
    if spec.config_text is not None:
        volumes.append({"name": "config", "configMap": {"name": f"{spec.name}-config"}})
    if volumes:
        pod["volumes"] = volumes
    return {"metadata": {"labels": dict(spec.labels)}, "spec": pod}


def _metadata(spec: K8sJob, name: str | None = None) -> Obj:
    return {"name": name or spec.name, "namespace": spec.namespace, "labels": dict(spec.labels)}


def _pod_failure_policy(action: str) -> Obj:
    # preempted, evicted or drained (Kubernetes marks the pod DisruptionTarget): not the job's fault. The exit code
    # cannot tell: torchrun, the container's first process, does not pass on the trainer's.
    return {"rules": [{"action": action, "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]}


def _indexed_job(spec: K8sJob) -> list[Obj]:
    service = {"apiVersion": "v1", "kind": "Service", "metadata": _metadata(spec), "spec": {
        "clusterIP": "None",  # headless: DNS names for the pods, no load balancing
        "publishNotReadyAddresses": True,  # pod 0 must resolve before anything is "ready"
        "selector": {"batch.kubernetes.io/job-name": spec.name},
        "ports": [{"name": "rdzv", "port": spec.port, "targetPort": spec.port}]}}
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": _metadata(spec), "spec": {
        "completionMode": "Indexed", "completions": spec.nodes, "parallelism": spec.nodes,
        # a crash on one node usually takes every node's pod down with it: budget restarts per incident
        "backoffLimit": spec.max_restarts * spec.nodes,
        "podFailurePolicy": _pod_failure_policy("Ignore"),  # not counted against backoffLimit
        "template": _pod_template(spec, "Never", subdomain=spec.name)}}  # podFailurePolicy needs Never
    return [service, job]


def _pytorchjob(spec: K8sJob) -> list[Obj]:
    replicas: Obj = {"Master": {"replicas": 1, "restartPolicy": "OnFailure",
                                "template": _pod_template(spec, "OnFailure")}}
    if spec.nodes > 1:
        replicas["Worker"] = {"replicas": spec.nodes - 1, "restartPolicy": "OnFailure",
                              "template": _pod_template(spec, "OnFailure")}
    return [{"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": _metadata(spec), "spec": {
        "runPolicy": {"backoffLimit": spec.max_restarts, "cleanPodPolicy": "None"},
        "pytorchReplicaSpecs": replicas}}]


def _jobset(spec: K8sJob) -> list[Obj]:
    job_spec = {"completionMode": "Indexed", "completions": spec.nodes, "parallelism": spec.nodes,
                "backoffLimit": 0,  # a failed pod fails its Job, and JobSet restarts the whole gang
                "podFailurePolicy": _pod_failure_policy("FailJob"),
                "template": _pod_template(spec, "Never")}
    return [{"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet", "metadata": _metadata(spec), "spec": {
        "network": {"enableDNSHostnames": True, "subdomain": spec.name, "publishNotReadyAddresses": True},
        "failurePolicy": {"maxRestarts": spec.max_restarts, "rules": [
            # a preempted pod (the podFailurePolicy above) restarts the gang without using up maxRestarts
            {"name": "preempted", "action": "RestartJobSetAndIgnoreMaxRestarts",
             "onJobFailureReasons": ["PodFailurePolicy"]}]},
        "replicatedJobs": [{"name": "trainer", "replicas": 1, "template": {"spec": job_spec}}]}}]


def render(spec: K8sJob, environ: dict[str, str] | None = None) -> list[Obj]:
    objs: list[Obj] = []
    if spec.config_text is not None:
        objs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": _metadata(spec, f"{spec.name}-config"),
                     "data": {"config.yaml": spec.config_text}})
    objs += {"indexed-job": _indexed_job, "pytorchjob": _pytorchjob, "jobset": _jobset}[spec.flavor](spec)
    assert_no_secret_values(to_yaml(objs), os.environ if environ is None else environ, "Kubernetes manifests")
    return objs


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (a shipped config) as readable literal blocks instead of escaped one-liners."""


def _str(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    style = "|" if "\n" in text and all(line == line.rstrip() for line in text.splitlines()) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(objs: list[Obj]) -> str:
    return yaml.dump_all(objs, Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True)


def apply(objs: list[Obj]) -> str:
    """``kubectl apply -f -``; returns kubectl's output."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise RuntimeError("kubectl not found on PATH: install it and point it at your cluster, or render with "
                           "--dry-run and apply the YAML yourself")
    done = subprocess.run([kubectl, "apply", "-f", "-"], input=to_yaml(objs), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"kubectl apply failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout
