"""``tarflow train --dry-run``: everything a run would check or decide before its first step, without training and
without writing anything, then the memory plan (``trainer.memory_plan``).

First the launch (``check_launch_config``: the config for this many ranks, the strategy against the launch, DeepSpeed
and its JSON): a config that cannot start is one error and no plan. Then the checks of what lies outside the config,
each reported as ``ok`` or ``FAIL`` and none stopping the others: the data (each split's manifest and every shard's
presence and size, then the model against its images), storage (the run directory and the checkpoint URI can
be written: local directories by permission bits, S3 by listing and by opening and aborting a multipart upload,
which writes no object), and the resume decision the run checkpointer would take. The memory plan is computed from
the config alone, so it is printed whatever those checks found: a config can be planned on a laptop that reaches
neither its data nor its bucket, and the command still fails (``DryRunReport.problems``) when a check did.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from cluster.env import ProcessEnv
from data_pipeline import SPLITS, load_embedded, split_heldout
from data_pipeline.config import DataConfig
from data_pipeline.manifest import Manifest, read_manifest
from data_pipeline.storage import DataSourceError, is_s3, join, split_s3
from data_pipeline.verify import check_shard_sizes

from .checkpoint import CheckpointError
from .checkpoint.run_checkpointer import RunCheckpointer
from .config import Config, validate
from .loop import check_launch_config, check_model_matches_data
from .memory_plan import MemoryPlan, format_plan, plan_memory, strategy_label
from .stores import StoreError, open_store
from .strategies import strategy_from_config

# What a check may find wrong outside the config (the project's own errors for data, stores and checkpoints, and
# the ValueError/OSError of a path); anything else is a bug and keeps its traceback.
CHECK_ERRORS = (DataSourceError, StoreError, CheckpointError, ValueError, OSError, ImportError)


@dataclass(frozen=True)
class Check:
    """One thing verified (``ok``: ``text`` says what) or not (``text``: the error, naming the thing to mend)."""

    name: str  # what was checked: data, train.run_dir, checkpoints, resume
    ok: bool
    text: str

    def format(self) -> str:
        return f"ok  {self.text}" if self.ok else f"FAIL {self.name}: {self.text}"


@dataclass(frozen=True)
class DryRunReport:
    checks: tuple[Check, ...]  # the config first, then data, run directory and checkpoints
    resume: str                # what the run would do about checkpoints, or why that could not be decided
    plan: MemoryPlan
    resume_failed: bool = False
    strategy_plans: tuple[MemoryPlan, ...] = ()  # --all-strategies: every strategy at the same launch

    @property
    def problems(self) -> list[str]:
        """The failed checks, one ``name: error`` each; the dry run fails (after printing) when there are any."""
        found = [f"{c.name}: {c.text}" for c in self.checks if not c.ok]
        return found + ([f"resume: {self.resume}"] if self.resume_failed else [])

    def format(self, cfg: Config) -> str:
        resume = f"FAIL resume: {self.resume}" if self.resume_failed else f"resume: {self.resume}"
        lines = [*(c.format() for c in self.checks), resume, format_plan(self.plan, cfg)]
        if self.strategy_plans:
            lines.append(format_strategy_table(self.strategy_plans, cfg))
        return "\n".join(lines)


def planned_bf16(cfg: Config) -> bool:
    """Whether the run would compute in bf16 (``trainer.runtime.resolve_precision``'s rule) on the device it names;
    ``train.device=auto`` plans for CUDA when this machine has it, else for the CPU."""
    t = cfg.train
    device = ("cuda" if torch.cuda.is_available() else "cpu") if t.device == "auto" else torch.device(t.device).type
    return t.precision == "bf16" or (t.precision == "auto" and device == "cuda" and t.noise != "uniform")


def dry_run(cfg: Config, env: ProcessEnv, all_strategies: bool = False) -> DryRunReport:
    """Check ``cfg`` for a launch of ``env.world_size`` ranks on ``env.num_nodes`` nodes and plan its memory
    (``all_strategies``: also for every strategy at that launch). Raises only for a config that cannot start."""
    check_launch_config(cfg, env)  # a config that cannot start raises: no plan for it
    checks = [Check("config", True, f"config: valid for {env.world_size} rank(s), train.strategy={cfg.train.strategy}, "
                    f"{cfg.train.global_batch // (cfg.train.micro_batch * env.world_size)} micro-batch(es) of "
                    f"{cfg.train.micro_batch} per rank and step")]
    checks += check_data_lines(cfg.data)
    if all(c.ok for c in checks):  # the model against the data's images, once the data can be read
        checks.append(attempt("model", lambda: (check_model_matches_data(cfg), "model: matches the data's images")[1]))
    checks.append(attempt("train.run_dir", lambda: check_writable_dir(cfg.train.run_dir, "train.run_dir")))
    uri = cfg.checkpoint.uri or str(Path(cfg.train.run_dir) / "checkpoints")
    checks.append(attempt("checkpoints", lambda: check_checkpoint_store(uri)))
    bf16 = planned_bf16(cfg)
    strategy = strategy_from_config(cfg, torch.device("cpu"), torch.bfloat16 if bf16 else None, env.world_size,
                                    env.num_nodes)
    if checks[-1].ok:
        decision = attempt("resume", lambda: RunCheckpointer(cfg, env, strategy, torch.device("cpu")).decide())
        resume, resume_failed = decision.text, not decision.ok
    else:  # the decision lists that store: its failure is already reported, once
        resume, resume_failed = f"not decided: {uri} could not be read (FAIL checkpoints above)", False
    plan = plan_memory(cfg, env.world_size, env.num_nodes, bf16, getattr(strategy, "ds_config", None))
    table = strategy_plans(cfg, env, bf16) if all_strategies else ()
    return DryRunReport(tuple(checks), resume, plan, resume_failed, table)


def attempt(name: str, check: Callable[[], str]) -> Check:
    """Run one check: its ``ok`` line, or its error as a ``FAIL`` line."""
    try:
        return Check(name, True, check())
    except CHECK_ERRORS as e:
        return Check(name, False, str(e) or type(e).__name__)


def check_data_lines(cfg: DataConfig) -> list[Check]:
    """``check_data`` as checks: one ``ok`` per split, or one ``FAIL data``."""
    try:
        return [Check("data", True, line) for line in check_data(cfg)]
    except CHECK_ERRORS as e:
        return [Check("data", False, str(e) or type(e).__name__)]


# ---------------------------------------------------------------- every strategy at one launch
def strategy_variants(cfg: Config, world_size: int) -> list[Config]:
    """``cfg`` under each strategy a launch of ``world_size`` ranks can use: single (one rank) or ddp, fsdp (with
    the config's fsdp section) and DeepSpeed ZeRO-1, 2 and 3 (with its deepspeed.config)."""
    def variant(strategy: str, stage: int | None = None) -> Config:
        deepspeed = dataclasses.replace(cfg.deepspeed, stage=stage) if stage else cfg.deepspeed
        return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, strategy=strategy), deepspeed=deepspeed)

    replica = "single" if world_size == 1 else "ddp"
    return [variant(replica), variant("fsdp"), *(variant("deepspeed", stage) for stage in (1, 2, 3))]


def strategy_plans(cfg: Config, env: ProcessEnv, bf16: bool) -> tuple[MemoryPlan, ...]:
    """The memory plan of every strategy variant (``strategy_variants``) at this launch. DeepSpeed need not be
    installed: its plan needs only the config dict we would hand it."""
    from .strategies.deepspeed_config import build_deepspeed_config

    plans = []
    for variant in strategy_variants(cfg, env.world_size):
        validate(variant, env.world_size)
        ds = build_deepspeed_config(variant, env.world_size, bf16) if variant.train.strategy == "deepspeed" else None
        plans.append(plan_memory(variant, env.world_size, env.num_nodes, bf16, ds))
    return tuple(plans)


def _gib(n: int) -> str:
    return f"{n / 2**30:,.2f}" if n else "-"


STRATEGY_COLUMNS = ("parameters", "gradients", "optimizer", "buffers", "state", "activations", "peak")


def format_strategy_table(plans: tuple[MemoryPlan, ...], cfg: Config) -> str:
    """One row per strategy, GiB per rank: the training state's parts, the configured activations and the rough
    peak (``MemoryPlan.peak``); ``*`` marks the configured strategy."""
    first = plans[0]
    a = first.activations
    ckpt = f"train.activation_checkpointing={cfg.train.activation_checkpointing}"
    lines = [f"per rank by strategy, GiB: {first.world_size} rank(s), {first.precision} compute, micro-batch "
             f"{a.micro_batch}, {ckpt} (optimizer: fp32 masters + AdamW moments; peak as above)",
             f"  {'strategy':<36}" + "".join(f"{c:>12}" for c in STRATEGY_COLUMNS)]
    configured = strategy_label(cfg)
    for plan in plans:
        s = plan.state
        where = " (host)" if s.location != "device" else ""
        row = (s.parameters, s.gradients, s.optimizer_state, s.buffers, s.total, plan.activations.configured,
               plan.peak)
        mark = "*" if plan.strategy == configured else " "
        lines.append(f"{mark} {plan.strategy + where:<36}" + "".join(f"{_gib(v):>12}" for v in row))
    return "\n".join(lines)


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
