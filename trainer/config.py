"""The training configuration: OmegaConf structured configs built from typed dataclasses.

A run's config is the dataclass defaults (the embedded digits run), then a YAML file, then ``key=value`` overrides.
Every layer is checked against the schema before it is merged, so a typo fails at once with the closest valid key;
values are type-checked by OmegaConf and range-checked here, each error naming its key. Sections flow down as
typed objects: ``TarFlow(cfg.model)``, ``build_loader(cfg.data, ...)``, ``build_optimizer(model, cfg.optim)``.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cluster.run_contract import PREEMPTION_EXIT_CODE
from data_pipeline.config import DataConfig
from data_pipeline.verify import VERIFY_MODES
from models import METHODS, InversionSettings, TarFlowConfig


class ConfigError(ValueError):
    """A configuration the run cannot start with; the message names the offending key."""


def _digits_model() -> TarFlowConfig:
    return TarFlowConfig(in_channels=1, img_size=8, patch_size=2, channels=128, head_dim=32, num_blocks=4,
                         layers_per_block=2, num_classes=10)


@dataclass
class OptimConfig:
    lr: float = 2e-3
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 1e-4
    # The reference decays every parameter; False exempts LayerNorms, biases and embeddings.
    decay_norms_biases_embeddings: bool = True
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping


@dataclass
class ScheduleConfig:
    warmup_steps: int = 100
    min_lr: float = 1e-6  # floor of the cosine, held after train.steps


@dataclass
class EMAConfig:
    """An exponential moving average of the weights (``trainer.ema``), kept in fp32 and sharded like the parameters;
    evaluation, sample grids and exports use it (``eval.weights``)."""

    decay: float = 0.0    # 0: no average; e.g. 0.999 (the weight of the old average per applied step)
    start_step: int = 0   # the average is a copy of the weights until this step
    warmup: bool = False  # decay min(decay, (1+n)/(10+n)) at the n-th update: early weights are forgotten quickly


@dataclass
class TrainConfig:
    run_dir: str = "runs/digits"
    steps: int = 1000
    global_batch: int = 128  # images per optimizer step, over all data-parallel ranks
    micro_batch: int = 128   # images per forward pass on one rank; the rest is gradient accumulation
    noise: str = "uniform"   # "uniform": dequantisation (bits/dim runs) | "gaussian": x + noise_std·ε
    noise_std: float = 0.05  # for noise=gaussian; also the σ of the denoising step
    label_drop: float = 0.1  # probability of dropping a label (→ −1) for classifier-free guidance
    seed: int = 0
    device: str = "auto"     # auto (CUDA if present, else CPU) | cpu | cuda | cuda:N
    # auto (bf16 autocast on bf16-capable CUDA, fp32 otherwise and for uniform noise) | fp32 | bf16
    precision: str = "auto"
    strategy: str = "single"  # single | ddp | fsdp | deepspeed (all but single under torchrun or deepspeed)
    activation_checkpointing: int = 0  # recompute every k-th transformer layer in backward (1: all; 0: off)
    compile: bool = False    # torch.compile each transformer layer (first steps slower while it compiles)
    max_nonfinite_steps: int = 10  # consecutive skipped (NaN/Inf) steps before the run stops
    resume: str = "auto"     # auto (newest complete checkpoint, if any) | never | a checkpoint's URI (…/step-NNNNNNNN)
    # refuse: a checkpoint continues only under a config that computes the same steps (trainer.resume_policy) |
    # allow: a deliberate change (optim.lr, ...) takes effect from the checkpoint's step, recorded in the run's history
    resume_changes: str = "refuse"
    ema: EMAConfig = field(default_factory=EMAConfig)


@dataclass
class FSDPConfig:
    """Options of ``train.strategy=fsdp``."""

    unit: str = "layer"                 # what one all-gather covers: "layer" (each transformer layer) | "block"
    reshard_after_forward: bool = True  # False keeps gathered parameters until backward: faster, more memory
    cpu_offload: bool = False           # sharded parameters, gradients and optimizer state live in host memory
    reduce_dtype: str = "fp32"          # gradient reduction; "bf16" only on request (likelihoods are sensitive)
    hybrid: bool = False                # shard within a node, replicate across nodes (a 2-D device mesh)


@dataclass
class DeepSpeedConfig:
    """Options of ``train.strategy=deepspeed``. Batch, accumulation, clipping, precision and the optimizer come from
    our own sections."""

    stage: int = 2    # ZeRO stage: 1 optimizer state, 2 + gradients, 3 + parameters partitioned over the ranks
    config: str = ""  # an expert DeepSpeed JSON merged into ours; a key contradicting our config is an error


@dataclass
class EvalConfig:
    every: int = 250      # steps between held-out bits/dim; 0: only at the start and the end
    at_start: bool = True
    batch_size: int = 256
    max_images: int = 0   # 0: the whole held-out split
    inception_weights: str = ""  # FID Inception weights file of the convention, or a directory; "": the usual places
    # ema: the weight average when the run keeps one (train.ema.decay > 0), else the trained weights | raw: always
    # the trained weights. Grids, FID and exports say which in their records and file names.
    weights: str = "ema"


@dataclass
class SampleConfig:
    every: int = 0        # steps between sample grids; 0: only at the end
    num: int = 64
    guidance: float = 1.0  # the guided grid's weight (a grid without guidance is always made)
    attn_temp: float = 1.0
    annealed: bool = False
    denoise: bool = True
    seed: int = 1234      # fixed noise and labels, so grids of different steps are comparable
    method: str = "sequential"  # block inversion: sequential (exact) | jacobi | gs-jacobi | auto (models.inversion)
    tol: float = 1e-4     # parallel methods: a token is final once a pass moves it by <= tol
    max_iters: int = 0    # parallel methods: passes per block; 0: T-1 (enough to be exact)
    window: int = 0       # jacobi, auto: tokens updated per pass after the finished ones; 0: all


@dataclass
class LoggingConfig:
    """Where metrics and sample grids go besides the console and ``run_dir/metrics.jsonl`` (rank 0 only).

    The wandb keys left empty take the ``WANDB_*`` environment (``WANDB_PROJECT``, ``WANDB_MODE``, ``WANDB_ENTITY``,
    ``WANDB_RUN_GROUP``, ``WANDB_TAGS``, ``WANDB_NAME``), then the defaults: project ``tarflow``, mode ``offline``,
    the run's name; a value given here is explicit and wins over the environment (``WANDB_MODE=disabled`` always
    turns wandb off)."""

    every: int = 50
    progress: bool = True
    run_name: str = ""         # the run's name in wandb and TensorBoard; "": $WANDB_NAME (wandb), else run_dir's name
    wandb: bool = False
    wandb_project: str = ""    # "": $WANDB_PROJECT, else "tarflow"
    wandb_mode: str = ""       # "" ($WANDB_MODE, else offline) | offline | online | disabled
    wandb_entity: str = ""     # "": $WANDB_ENTITY, else your default entity
    wandb_group: str = ""      # "": $WANDB_RUN_GROUP (a scaling study sets its name)
    wandb_tags: List[str] = field(default_factory=list)  # []: $WANDB_TAGS (comma-separated)
    tensorboard: bool = False  # scalars and sample grids as TensorBoard event files
    # "": run_dir/tensorboard; a directory shared by several runs (a study's) holds one subdirectory per run_name
    tensorboard_dir: str = ""
    peak_flops: float = 0.0    # per-device peak FLOP/s for MFU; 0: a known accelerator's, else no MFU


@dataclass
class CheckpointConfig:
    every: int = 250   # steps between checkpoints (one is always written at the end)
    uri: str = ""      # a directory or s3://bucket/prefix; "": run_dir/checkpoints (credentials: the AWS chain only)
    keep: int = 2      # newest complete checkpoints kept (at least 2)
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this (0: none)
    async_upload: bool = True  # upload in the background while training goes on (the next save waits for it)


@dataclass
class PreemptionConfig:
    """A signal or the wall-clock budget → save at the next step boundary, wait for the upload, exit."""

    signals: List[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    exit_code: int = PREEMPTION_EXIT_CODE  # 75, EX_TEMPFAIL: "try again"; cluster launchers requeue on it
    time_limit_minutes: float = 0.0  # stop as if preempted after this much wall-clock time (0: no limit)


@dataclass
class Config:
    model: TarFlowConfig = field(default_factory=_digits_model)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    preemption: PreemptionConfig = field(default_factory=PreemptionConfig)


NOISE_KINDS = ("uniform", "gaussian")
PRECISIONS = ("auto", "fp32", "bf16")
RESUME_CHANGES = ("refuse", "allow")
EVAL_WEIGHTS = ("ema", "raw")
WANDB_MODES = ("", "offline", "online", "disabled")


# ---------------------------------------------------------------- loading
def split_config_and_overrides(args: Sequence[str]) -> tuple[str | None, list[str]]:
    """``tarflow train [CONFIG] [key=value ...]``: the first argument is a config file unless it is an override."""
    if args and "=" not in args[0]:
        return args[0], list(args[1:])
    return None, list(args)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), base: Config | None = None,
                world_size: int = 1) -> Config:
    """Defaults (or ``base``) ← YAML file ← ``key=value`` overrides, checked and validated for a launch of
    ``world_size`` data-parallel processes (``validate``); the typed config."""
    merged: DictConfig = OmegaConf.structured(base if base is not None else Config)
    layers: list[tuple[str, Any]] = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        layers.append((str(path), OmegaConf.load(path)))
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must look like key=value, got {bad[0]!r}")
        layers.append(("command line", OmegaConf.from_dotlist(list(overrides))))
    for origin, layer in layers:
        check_keys(OmegaConf.to_container(layer), Config, prefix="", origin=origin)
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as e:
            message = str(getattr(e, "msg", e)).splitlines()[0]
            raise ConfigError(f"{getattr(e, 'full_key', None) or origin}: {message}") from None
    try:
        cfg = OmegaConf.to_object(merged)
    except (ValueError, OmegaConfBaseException) as e:  # TarFlowConfig validates itself on construction
        raise ConfigError(str(e).replace("TarFlowConfig.", "model.")) from None
    validate(cfg, world_size)
    return cfg


def check_keys(node: Any, schema: type, prefix: str = "", origin: str = "") -> None:
    """Unknown keys of a plain mapping ``node`` against the dataclass ``schema``, recursively through the fields
    whose type is a dataclass: a ``ConfigError`` naming the key (``prefix`` + key), where it came from (``origin``)
    and the closest valid key ("did you mean ...?")."""
    if not isinstance(node, dict):
        return
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in node.items():
        full = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(fields)}"
            raise ConfigError(f"unknown config key '{full}' (from {origin}){hint}")
        sub = fields[key].type
        sub_type = _dataclass_type(sub, schema)
        if sub_type is not None:
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{full}' is a section; give its fields, e.g. {full}.<field>=...")
            check_keys(value, sub_type, prefix=f"{full}.", origin=origin)


def _dataclass_type(annotation: Any, owner: type) -> type | None:
    """The dataclass behind a field annotation (annotations are strings under ``from __future__``)."""
    if isinstance(annotation, str):
        import sys
        annotation = {**vars(sys.modules[owner.__module__])}.get(annotation, None)
    return annotation if dataclasses.is_dataclass(annotation) else None


# ---------------------------------------------------------------- validation
def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def validate(cfg: Config, world_size: int = 1) -> None:
    """Range and cross-field checks, each naming its key. ``world_size`` is the data-parallel size."""
    t, o = cfg.train, cfg.optim
    _require(t.steps >= 1, "train.steps", f"must be >= 1, got {t.steps}")
    _require(t.micro_batch >= 1, "train.micro_batch", f"must be >= 1, got {t.micro_batch}")
    per_step = t.micro_batch * world_size
    _require(t.global_batch >= 1 and t.global_batch % per_step == 0, "train.global_batch",
             f"{t.global_batch} is not divisible by train.micro_batch × data-parallel size = "
             f"{t.micro_batch} × {world_size} = {per_step}")
    _require(t.noise in NOISE_KINDS, "train.noise", f"must be one of {NOISE_KINDS}, got {t.noise!r}")
    _require(t.noise_std > 0, "train.noise_std", f"must be > 0, got {t.noise_std}")
    _require(0 <= t.label_drop < 1, "train.label_drop", f"must be in [0, 1), got {t.label_drop}")
    _require(t.precision in PRECISIONS, "train.precision", f"must be one of {PRECISIONS}, got {t.precision!r}")
    _require(t.resume_changes in RESUME_CHANGES, "train.resume_changes",
             f"must be one of {RESUME_CHANGES}, got {t.resume_changes!r}")
    from .strategies import STRATEGIES  # the registry itself; imported here because strategies import this module

    _require(t.strategy in STRATEGIES, "train.strategy", f"must be one of {tuple(STRATEGIES)}, got {t.strategy!r}")
    _require(t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda"), "train.device",
             f"must be auto, cpu, cuda or cuda:N, got {t.device!r}")
    _require(cfg.fsdp.unit in ("layer", "block"), "fsdp.unit", f"must be layer or block, got {cfg.fsdp.unit!r}")
    _require(cfg.fsdp.reduce_dtype in ("fp32", "bf16"), "fsdp.reduce_dtype",
             f"must be fp32 or bf16, got {cfg.fsdp.reduce_dtype!r}")
    _require(cfg.deepspeed.stage in (1, 2, 3), "deepspeed.stage", f"must be 1, 2 or 3, got {cfg.deepspeed.stage}")
    _require(t.activation_checkpointing >= 0, "train.activation_checkpointing",
             f"must be >= 0 (0: off, k: every k-th layer), got {t.activation_checkpointing}")
    _require(0 <= t.ema.decay < 1, "train.ema.decay", f"must be in [0, 1) (0: no average), got {t.ema.decay}")
    _require(t.ema.start_step >= 0, "train.ema.start_step", f"must be >= 0, got {t.ema.start_step}")
    _require(cfg.eval.weights in EVAL_WEIGHTS, "eval.weights",
             f"must be one of {EVAL_WEIGHTS} (ema: the average when the run keeps one), got {cfg.eval.weights!r}")
    _require(t.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", f"must be >= 1, got {t.max_nonfinite_steps}")
    _require(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
    _require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas",
             f"must be two numbers in [0, 1), got {list(o.betas)}")
    _require(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    _require(o.grad_clip >= 0, "optim.grad_clip", f"must be >= 0 (0 disables), got {o.grad_clip}")
    s = cfg.schedule
    _require(0 <= s.warmup_steps < t.steps, "schedule.warmup_steps",
             f"must be in [0, train.steps={t.steps}), got {s.warmup_steps}")
    _require(0 <= s.min_lr <= o.lr, "schedule.min_lr", f"must be in [0, optim.lr={o.lr}], got {s.min_lr}")
    for key, value in (("eval.every", cfg.eval.every), ("sample.every", cfg.sample.every),
                       ("logging.every", cfg.logging.every), ("checkpoint.every", cfg.checkpoint.every),
                       ("eval.max_images", cfg.eval.max_images)):
        _require(value >= 0, key, f"must be >= 0, got {value}")
    _require(cfg.logging.every >= 1, "logging.every", f"must be >= 1, got {cfg.logging.every}")
    _require(cfg.eval.batch_size >= 1, "eval.batch_size", f"must be >= 1, got {cfg.eval.batch_size}")
    _require(cfg.sample.num >= 1, "sample.num", f"must be >= 1, got {cfg.sample.num}")
    _require(cfg.sample.attn_temp > 0, "sample.attn_temp", f"must be > 0, got {cfg.sample.attn_temp}")
    sc = cfg.sample
    _require(sc.method in METHODS, "sample.method", f"must be one of {METHODS}, got {sc.method!r}")
    for key in ("max_iters", "window"):
        _require(getattr(sc, key) >= 0, f"sample.{key}", f"must be >= 0 (0: the default), got {getattr(sc, key)}")
    try:
        InversionSettings(method=sc.method, tol=sc.tol, max_iters=sc.max_iters or None, window=sc.window or None)
    except ValueError as e:
        _require(False, "sample.tol", str(e))
    _require(cfg.data.verify in VERIFY_MODES, "data.verify", f"must be one of {VERIFY_MODES} (size: every shard "
             f"present with the manifest's size; sha256: digests too; none), got {cfg.data.verify!r}")
    _require(cfg.data.streams >= 0, "data.streams", f"must be >= 0 (0: the default), got {cfg.data.streams}")
    _require(cfg.checkpoint.keep >= 2, "checkpoint.keep", f"must be >= 2 (the one before the newest is the fallback "
             f"when the newest fails verification), got {cfg.checkpoint.keep}")
    _require(cfg.checkpoint.keep_every >= 0, "checkpoint.keep_every", f"must be >= 0, got {cfg.checkpoint.keep_every}")
    _require(0 <= cfg.preemption.exit_code <= 255, "preemption.exit_code",
             f"must be in [0, 255], got {cfg.preemption.exit_code}")
    _require(cfg.preemption.time_limit_minutes >= 0, "preemption.time_limit_minutes",
             f"must be >= 0, got {cfg.preemption.time_limit_minutes}")
    _require(cfg.logging.wandb_mode in WANDB_MODES, "logging.wandb_mode",
             f"must be offline, online, disabled or empty (WANDB_MODE, else offline), got {cfg.logging.wandb_mode!r}")
    name = cfg.logging.run_name
    _require("/" not in name and name not in (".", ".."), "logging.run_name",
             f"names a run and its directory in logging.tensorboard_dir: no '/', not '.' or '..'; got {name!r}")


# ---------------------------------------------------------------- persistence
def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_hash(cfg: Config) -> str:
    """Identity of the resolved config, stored with checkpoints."""
    return hashlib.sha256(to_yaml(cfg).encode()).hexdigest()[:16]


def from_yaml_text(text: str) -> Config:
    """Rebuild a typed config from a saved resolved config (checkpoints carry theirs)."""
    layer = OmegaConf.create(text)
    check_keys(OmegaConf.to_container(layer), Config, prefix="", origin="saved config")
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), layer))
    validate(cfg)
    return cfg
