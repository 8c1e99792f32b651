"""cluster.k8s: every flavor's manifests validate offline, strictly.

- Core objects (ConfigMap, Service, Job) and every pod/job template nested in a custom resource: kubernetes-validate
  --strict against the Kubernetes OpenAPI schemas it ships (unknown fields are errors).
- PyTorchJob: the typed models of the Kubeflow training SDK (kubeflow-training), read strictly: every field must be
  one the model declares, with the declared type, down to the Kubernetes models of the pod template.
- JobSet: the typed (pydantic, strict types) JobSet v1alpha2 models in kubeflow-trainer-api (Kubeflow Trainer
  builds on JobSet and ships its API models); a field the model does not know would be dropped, so the manifest
  must survive a round trip through it unchanged.
"""

from __future__ import annotations

import re
from pathlib import Path

import kubernetes.client as k8s_models
import kubernetes_validate
import pytest
import yaml
from kubeflow.training import models as kubeflow_models
from kubeflow_trainer_api.models import JobsetV1alpha2JobSet

from cluster.env import discover
from cluster.k8s import FLAVORS, K8sJob, render, to_yaml
from cluster.launch_cli import parse_toleration
from tarflow.main import main as launch_main

REPO = Path(__file__).resolve().parents[1]
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
K8S_VERSION = kubernetes_validate.latest_version()


def _spec(flavor: str = "indexed-job", **kw) -> K8sJob:
    defaults = dict(name="tf-run", image="registry.example/tarflow:1", namespace="ml", nodes=2, gpus_per_node=8,
                    cpu="32", memory="256Gi", node_selector={"gpu": "h100"}, s3_secret="tarflow-s3",
                    tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                    config_text="train:\n  steps: 10\n", overrides=["train.steps=20"], run_dir="/scratch/run",
                    checkpoint_uri="s3://bucket/runs/x",
                    flavor=flavor)
    return K8sJob(**{**defaults, **kw})


def _validate_core(obj: dict) -> None:
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:  # its message embeds the whole schema: keep the first line
        pytest.fail(f"{obj['kind']} {obj['metadata']['name']}: {str(e).splitlines()[0]} at {list(e.path)}")


def _pod_template_as_core(template: dict) -> dict:
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}


def _job_spec_as_core(spec: dict) -> dict:
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "t"}, "spec": spec}


_PRIMITIVES = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object}


def _typed(data, typ: str, path: str = "$"):
    """Build the swagger-generated model ``typ`` from ``data``, refusing unknown fields and wrong types."""
    if m := re.fullmatch(r"list\[(.+)\]", typ):
        assert isinstance(data, list), f"{path}: expected a list"
        return [_typed(x, m.group(1), f"{path}[{i}]") for i, x in enumerate(data)]
    if m := re.fullmatch(r"dict\(str, (.+)\)", typ):
        assert isinstance(data, dict), f"{path}: expected a mapping"
        return {k: _typed(v, m.group(1), f"{path}.{k}") for k, v in data.items()}
    if typ in _PRIMITIVES:
        assert isinstance(data, _PRIMITIVES[typ]) and not (typ == "int" and isinstance(data, bool)), \
            f"{path}: {data!r} is not {typ}"
        return data
    cls = getattr(kubeflow_models, typ, None) or getattr(k8s_models, typ)
    assert isinstance(data, dict), f"{path}: expected a {typ}"
    field_of = {json_name: attr for attr, json_name in cls.attribute_map.items()}
    unknown = sorted(set(data) - set(field_of))
    assert not unknown, f"{path}: {typ} has no field {unknown}"
    return cls(**{field_of[k]: _typed(v, cls.openapi_types[field_of[k]], f"{path}.{k}") for k, v in data.items()})


def _contained(small, big, path="$") -> None:
    """Every value of ``small`` is in ``big`` (``big`` may add defaults)."""
    if isinstance(small, dict):
        assert isinstance(big, dict), path
        for k, v in small.items():
            assert k in big, f"{path}.{k} was dropped: the model does not know it"
            _contained(v, big[k], f"{path}.{k}")
    elif isinstance(small, list):
        assert isinstance(big, list) and len(small) == len(big), path
        for i, (a, b) in enumerate(zip(small, big)):
            _contained(a, b, f"{path}[{i}]")
    else:
        assert small == big, f"{path}: {small!r} became {big!r}"


def _validate_typed(obj: dict) -> None:
    """A custom resource against its published typed model."""
    if obj["kind"] == "PyTorchJob":
        job = _typed(obj, "KubeflowOrgV1PyTorchJob")
        assert job.spec.pytorch_replica_specs["Master"].replicas == 1
    elif obj["kind"] == "JobSet":
        _contained(obj, JobsetV1alpha2JobSet.from_dict(obj).to_dict())


def _validate_schemas(obj: dict) -> None:
    """A core object, or the pod and job templates inside a custom resource, against the Kubernetes schemas."""
    if obj["kind"] == "PyTorchJob":
        for replica in obj["spec"]["pytorchReplicaSpecs"].values():
            _validate_core(_pod_template_as_core(replica["template"]))
    elif obj["kind"] == "JobSet":
        for rjob in obj["spec"]["replicatedJobs"]:
            _validate_core(_job_spec_as_core(rjob["template"]["spec"]))
    else:
        _validate_core(obj)


def _validate(objs: list[dict]) -> None:
    for obj in objs:
        _validate_typed(obj)
        _validate_schemas(obj)


def _containers(objs: list[dict]) -> list[dict]:
    """Every container of every pod template, wherever the flavor nests it."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            if "containers" in node:
                found.extend(node["containers"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    walk(objs)
    return found


@pytest.mark.parametrize("flavor", FLAVORS)
def test_every_flavor_validates(flavor):
    objs = render(_spec(flavor))
    assert [o["kind"] for o in objs] == {"indexed-job": ["ConfigMap", "Service", "Job"],
                                         "pytorchjob": ["ConfigMap", "PyTorchJob"],
                                         "jobset": ["ConfigMap", "JobSet"]}[flavor]
    _validate(objs)
    assert list(yaml.safe_load_all(to_yaml(objs))) == objs  # the multi-document YAML is the same objects
    # the smallest spec validates too (no secret, CPU only, config inside the image, one node)
    _validate(render(K8sJob(name="small", image="img", flavor=flavor, config="configs/digits.yaml")))


@pytest.mark.parametrize("flavor", FLAVORS)
def test_the_validators_are_strict(flavor):
    """A misspelt field must fail each validator on its own, or passing them would mean little."""
    validators = [_validate_schemas] + ([_validate_typed] if flavor != "indexed-job" else [])
    for validate in validators:
        objs = render(_spec(flavor))
        _containers(objs)[0]["imagePullPolicyy"] = "Always"
        with pytest.raises((AssertionError, pytest.fail.Exception)):
            validate(objs[-1])
    objs = render(_spec(flavor))
    objs[-1]["spec"]["bogus"] = 1
    with pytest.raises((AssertionError, pytest.fail.Exception)):
        (_validate_typed if flavor != "indexed-job" else _validate_schemas)(objs[-1])


@pytest.mark.parametrize("flavor", FLAVORS)
def test_secret_by_name_only_and_gpus_as_limits(flavor, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    objs = render(_spec(flavor))
    text = to_yaml(objs)
    assert SECRET not in text and "AWS_SECRET_ACCESS_KEY" not in text
    containers = _containers(objs)
    assert containers
    for c in containers:
        assert c["envFrom"] == [{"secretRef": {"name": "tarflow-s3"}}]
        assert all("value" in e or "fieldRef" in e.get("valueFrom", {}) for e in c["env"])  # no secretKeyRef copies
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "8"
        assert c["resources"]["requests"] == {"cpu": "32", "memory": "256Gi"}
        assert "--nproc_per_node=8" in c["command"] and "--rdzv_backend=c10d" in c["command"]
        assert c["command"][-5:] == ["/etc/tarflow/config.yaml", "train.steps=20", "train.resume=auto",
                                     "train.run_dir=/scratch/run", "checkpoint.uri=s3://bucket/runs/x"]
    with pytest.raises(ValueError, match="AWS_SECRET_ACCESS_KEY"):  # smuggled in through an override
        render(_spec(flavor, overrides=[f"data.key={SECRET}"]))


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


def test_indexed_job_rendezvous_at_pod_zero_through_the_headless_service():
    _, service, job = render(_spec("indexed-job"))
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 2, 2)
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"] and pod["restartPolicy"] == "Never"
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": job["metadata"]["name"]}
    assert _env(pod["containers"][0])["MASTER_ADDR"] == "tf-run-0.tf-run"  # <job>-<index>.<subdomain>
    assert spec["podFailurePolicy"]["rules"][0] == {
        "action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert pod["nodeSelector"] == {"gpu": "h100"} and pod["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_indexed_job_pod_environment_is_understood_by_discover():
    """What a one-process pod sees: the manifest's variables plus the index Kubernetes adds."""
    (_, job) = render(_spec("indexed-job", gpus_per_node=0, config_text=None))
    env = discover({**_env(job["spec"]["template"]["spec"]["containers"][0]), "JOB_COMPLETION_INDEX": "1"})
    assert (env.rank, env.world_size, env.node_rank, env.master_addr, env.master_port) == (1, 2, 1, "tf-run-0.tf-run",
                                                                                           29500)
    assert (env.scheduler, env.cluster, env.job_id) == ("k8s", "k8s", "tf-run")


def test_pytorchjob_master_and_workers():
    (_, job) = render(_spec("pytorchjob", nodes=3))
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert (replicas["Master"]["replicas"], replicas["Worker"]["replicas"]) == (1, 2)
    container = replicas["Worker"]["template"]["spec"]["containers"][0]
    assert container["name"] == "pytorch"  # the operator finds its container and port by these names
    assert container["ports"] == [{"name": "pytorchjob-port", "containerPort": 29500}]
    assert "MASTER_ADDR" not in _env(container)  # the operator sets it
    assert job["spec"]["runPolicy"]["backoffLimit"] == 3
    assert "Worker" not in render(_spec("pytorchjob", nodes=1))[1]["spec"]["pytorchReplicaSpecs"]


def test_jobset_restarts_the_gang_and_passes_its_restart_attempt():
    (_, js) = render(_spec("jobset"))
    assert js["spec"]["failurePolicy"]["maxRestarts"] == 3
    assert js["spec"]["failurePolicy"]["rules"][0]["action"] == "RestartJobSetAndIgnoreMaxRestarts"
    (rjob,) = js["spec"]["replicatedJobs"]
    container = rjob["template"]["spec"]["template"]["spec"]["containers"][0]
    assert _env(container)["MASTER_ADDR"] == f"tf-run-{rjob['name']}-0-0.{js['spec']['network']['subdomain']}"
    restart = next(e for e in container["env"] if e["name"] == "TARFLOW_RESTART_COUNT")
    assert restart["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.annotations['jobset.sigs.k8s.io/restart-attempt']"


@pytest.mark.parametrize("kw, message", [({"name": "Bad_Name"}, "name="), ({"name": "x" * 41}, "name="),
                                         ({"flavor": "mpi"}, "flavor="), ({"nodes": 0}, "nodes=0"),
                                         ({"port": 0}, "port=0")])
def test_bad_specs_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        _spec(**kw)


def test_tolerations_from_the_command_line():
    assert parse_toleration("nvidia.com/gpu:NoSchedule") == {"key": "nvidia.com/gpu", "operator": "Exists",
                                                             "effect": "NoSchedule"}
    assert parse_toleration("pool=gpu") == {"key": "pool", "operator": "Equal", "value": "gpu"}
    with pytest.raises(ValueError, match="effect"):
        parse_toleration("a:Sometimes")


@pytest.mark.parametrize("flavor", FLAVORS)
def test_cli_renders_valid_manifests(flavor, capsys):
    assert launch_main(["launch", "k8s", str(REPO / "configs/digits.yaml"), "train.steps=5", "schedule.warmup_steps=1",
                        "train.strategy=ddp", "train.micro_batch=16", "--image", "img:1",
                        "--flavor", flavor, "--nodes", "2", "--gpus-per-node", "4", "--s3-secret", "s3",
                        "--checkpoint-uri", "s3://b/r",
                        "--node-selector", "pool=gpu", "--toleration", "nvidia.com/gpu:NoSchedule"]) == 0
    objs = list(yaml.safe_load_all(capsys.readouterr().out))
    _validate(objs)
    assert objs[0]["kind"] == "ConfigMap" and "num_classes: 10" in objs[0]["data"]["config.yaml"]
    assert objs[-1]["metadata"]["name"] == "tarflow-digits"


def test_a_job_that_could_only_fail_at_start_is_refused_before_rendering(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no kubectl: nothing could be applied anyway
    for mode in ([], ["--apply"]):
        code = launch_main(["launch", "k8s", str(REPO / "configs/digits.yaml"), "train.strategy=ddp", "--image", "img",
                            "--nodes", "2", "--gpus-per-node", "2", *mode])
        captured = capsys.readouterr()
        assert (code, captured.out) == (2, "")
        assert captured.err == ("tarflow launch: error: train.global_batch: 128 is not divisible by train.micro_batch "
                                "× data-parallel size = 128 × 4 = 512 (the launch starts --nodes 2 × --nproc-per-node "
                                "2 = 4 processes)\n")
    assert launch_main(["launch", "k8s", "--image", "img", "--nodes", "2"]) == 2
    assert "train.strategy=single trains in one process, but the launch starts --nodes 2" in capsys.readouterr().err


def test_a_config_inside_the_image_is_left_to_the_job(capsys):
    assert launch_main(["launch", "k8s", "/app/configs/mine.yaml", "--image", "img"]) == 0
    captured = capsys.readouterr()
    assert "/app/configs/mine.yaml is not here, so the config is checked only when the job starts" in captured.err
    assert "/app/configs/mine.yaml" in captured.out


def test_apply_without_kubectl_says_so(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH with no kubectl on it
    assert launch_main(["launch", "k8s", "--image", "img", "--apply"]) == 1
    assert "kubectl not found" in capsys.readouterr().err
