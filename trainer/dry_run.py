"""``tarflow train --dry-run``: everything a run would check or decide before its first step, without training and
without writing anything, then the memory plan (``trainer.memory_plan``).

In order: the launch (``check_launch``: the config for this many ranks, the strategy against the launch, DeepSpeed
and its JSON, the model against the data's images), the data (each split's manifest and every shard's presence and
size), storage (the run directory and the checkpoint URI can be written: local directories by permission bits,
S3 by listing and by opening and aborting a multipart upload, which writes no object), and the resume decision the
run checkpointer would take. Each failure is the error the run itself would raise, naming the thing to mend.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from cluster.env import ProcessEnv
from data_pipeline import SPLITS, load_embedded, split_heldout
from data_pipeline.config import DataConfig
from data_pipeline.manifest import Manifest, read_manifest
from data_pipeline.storage import is_s3, join, split_s3
from data_pipeline.verify import check_shard_sizes

from .checkpoint.run_checkpointer import RunCheckpointer
from .config import Config
from .loop import check_launch
from .memory_plan import MemoryPlan, format_plan, plan_memory
from .stores import StoreError, open_store
from .strategies import strategy_from_config


@dataclass(frozen=True)
class DryRunReport:
    checks: tuple[str, ...]  # what was verified, one line each
    resume: str              # what the run would do about checkpoints
    plan: MemoryPlan

    def format(self, cfg: Config) -> str:
        return "\n".join([*(f"ok  {c}" for c in self.checks), f"resume: {self.resume}", format_plan(self.plan, cfg)])


def planned_bf16(cfg: Config) -> bool:
    """Whether the run would compute in bf16 (``trainer.runtime.resolve_precision``'s rule) on the device it names;
    ``train.device=auto`` plans for CUDA when this machine has it, else for the CPU."""
    t = cfg.train
    device = ("cuda" if torch.cuda.is_available() else "cpu") if t.device == "auto" else torch.device(t.device).type
    return t.precision == "bf16" or (t.precision == "auto" and device == "cuda" and t.noise != "uniform")


def dry_run(cfg: Config, env: ProcessEnv) -> DryRunReport:
    """Check ``cfg`` for a launch of ``env.world_size`` ranks on ``env.num_nodes`` nodes and plan its memory."""
    check_launch(cfg, env)
    checks = [f"config: valid for {env.world_size} rank(s), train.strategy={cfg.train.strategy}, "
              f"{cfg.train.global_batch // (cfg.train.micro_batch * env.world_size)} micro-batch(es) of "
              f"{cfg.train.micro_batch} per rank and step"]
    checks += check_data(cfg.data)
    checks.append(check_writable_dir(cfg.train.run_dir, "train.run_dir"))
    uri = cfg.checkpoint.uri or str(Path(cfg.train.run_dir) / "checkpoints")
    checks.append(check_checkpoint_store(uri))
    bf16 = planned_bf16(cfg)
    strategy = strategy_from_config(cfg, torch.device("cpu"), torch.bfloat16 if bf16 else None, env.world_size,
                                    env.num_nodes)
    resume = RunCheckpointer(cfg, env, strategy, torch.device("cpu")).decide()
    ds_config = getattr(strategy, "ds_config", None)
    plan = plan_memory(cfg, env.world_size, env.num_nodes, bf16, ds_config)
    return DryRunReport(tuple(checks), resume, plan)


# ---------------------------------------------------------------- data
def check_data(cfg: DataConfig) -> list[str]:
    """One line per split: how many images it has and that its shards are all there at their manifest's size."""
    if cfg.format == "embedded":
        data = load_embedded(cfg.source)
        train, heldout = split_heldout(len(data.images), cfg.heldout_fraction, cfg.split_seed)
        return [f"data: embedded {cfg.source!r}, {len(train):,} training and {len(heldout):,} held-out images"]
    lines = []
    for split in SPLITS:
        manifest = _SHARDED_CHECKS[cfg.format](cfg.uri, split)
        size = sum(s.bytes for s in manifest.shards)
        lines.append(f"data {split}: {manifest.num_samples:,} images in {len(manifest.shards)} {cfg.format} shard(s) "
                     f"({size / 2**20:,.1f} MiB) under {join(cfg.uri, split)}, every shard present at its manifest "
                     f"size" + ("; sha256 digests are compared when the run reads the shards"
                                if cfg.verify == "sha256" else ""))
    return lines


def _webdataset_split(uri: str, split: str) -> Manifest:
    manifest = read_manifest(uri, split, "webdataset")
    check_shard_sizes(join(uri, split), manifest, "size")  # whatever data.verify says: the dry run is for this
    return manifest


def _mds_split(uri: str, split: str) -> Manifest:
    from data_pipeline.mds_layout import read_split  # manifest, MDS index and shards checked against each other

    return read_split(uri, split, verify="size").manifest


# How each sharded format's split is checked without reading a shard (embedded sets are checked by loading them).
_SHARDED_CHECKS = {"webdataset": _webdataset_split, "mds": _mds_split}


# ---------------------------------------------------------------- storage
def check_writable_dir(path: str, key: str) -> str:
    """A local directory the run could create (or already has) and write into, checked without creating it."""
    target = Path(path).absolute()
    existing = target
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{key}={path!r}: {existing} is a file, not a directory; choose another {key}")
    readonly = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
    if readonly or not os.access(existing, os.W_OK | os.X_OK):
        why = "is on a read-only file system" if readonly else "is not writable by this user"
        raise ValueError(f"{key}={path!r}: {existing} {why}; choose a directory you can write to")
    state = "exists" if existing == target else f"would be created under {existing}"
    return f"{key}: {target} {state}, writable"


def check_checkpoint_store(uri: str) -> str:
    """The checkpoint store can be listed and written: a local directory by permissions, S3 by a listing and a
    multipart upload opened and aborted at once (PutObject's permission, no object ever appears)."""
    if not is_s3(uri):
        local = uri[len("file://"):] if uri.startswith("file://") else uri
        return check_writable_dir(local, "checkpoint.uri").replace("checkpoint.uri: ", "checkpoints: ", 1)
    store = open_store(uri)
    listed = store.list("step-")  # endpoint, credentials and bucket; a StoreError names what failed
    probe(uri)
    return f"checkpoints: {uri} reachable ({len(listed)} object(s) under step-*), writable"


def probe(uri: str) -> None:
    """Ask S3 whether this identity may write under ``uri`` without writing: open a multipart upload (it needs
    s3:PutObject) and abort it."""
    from botocore.exceptions import BotoCoreError, ClientError

    from data_pipeline.s3 import s3_client

    bucket, prefix = split_s3(uri)
    key = f"{prefix.strip('/')}/.tarflow-dry-run-probe".lstrip("/")
    client = s3_client()
    try:
        upload = client.create_multipart_upload(Bucket=bucket, Key=key)
        client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload["UploadId"])
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        raise StoreError(f"checkpoint.uri={uri}: this identity may not write there (S3 says {code}); grant "
                         f"s3:PutObject on s3://{bucket}/{prefix}* or choose another checkpoint.uri") from None
    except BotoCoreError as e:
        raise StoreError(f"checkpoint.uri={uri}: cannot open an upload ({type(e).__name__}: {e})") from None
