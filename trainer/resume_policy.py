"""Whether a config may continue a checkpoint written under another one, and the record of the configs a run ran under.

Every config key is in ``RESUME_KINDS``, one of three kinds:

- ``FREE``: changes when a step happens, how it is launched or what is logged, never what a step computes (intervals,
  logging, ``train.steps``, the launch shape: micro-batch, strategy, device, activation checkpointing, compile);
- ``TRAJECTORY``: changes what the run computes from here on (learning rate, seed, batch, noise, data, precision ...):
  refused unless ``train.resume_changes=allow`` says the change is deliberate, and then recorded in the run's history;
- ``MODEL``: the checkpoint's weights do not fit: refused whatever ``train.resume_changes`` says.

A key missing from the table is a bug that ``tests/test_resume_policy.py`` reports; classify a new key there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf

from .checkpoint.files import CheckpointError
from .config import Config, ConfigError, config_hash

FREE, TRAJECTORY, MODEL = "free", "trajectory", "model"
CONFIG_HISTORY_FILE = "config_history.jsonl"  # run_dir's readable copy of the history every checkpoint carries


def _keys(kind: str, section: str, *names: str) -> dict[str, str]:
    return {f"{section}.{name}": kind for name in names}


RESUME_KINDS: dict[str, str] = {
    **_keys(MODEL, "model", "in_channels", "img_size", "patch_size", "channels", "num_blocks", "layers_per_block",
            "head_dim", "expansion", "nvp", "num_classes"),
    # Which images, split, order and augmentation the steps see (data.streams fixes the webdataset order); the
    # worker count, the shard cache and how shards are verified are not part of that (the loaders hand out the same
    # batches whatever the workers).
    **_keys(TRAJECTORY, "data", "format", "source", "uri", "heldout_fraction", "split_seed", "random_flip", "resize",
            "crop", "shuffle_buffer", "num_canonical_nodes", "streams", "skip_corrupt"),
    **_keys(FREE, "data", "num_workers", "cache_dir", "verify"),
    **_keys(TRAJECTORY, "optim", "lr", "betas", "eps", "weight_decay", "decay_norms_biases_embeddings", "grad_clip"),
    **_keys(TRAJECTORY, "schedule", "warmup_steps", "min_lr"),
    # train.steps moves the end of the cosine (extending a run is the common case); the launch shape leaves every
    # step's samples, noise and update as they are; max_nonfinite_steps only decides when a failing run gives up.
    **_keys(FREE, "train", "run_dir", "steps", "micro_batch", "device", "strategy", "activation_checkpointing",
            "compile", "max_nonfinite_steps", "resume", "resume_changes"),
    **_keys(TRAJECTORY, "train", "global_batch", "noise", "noise_std", "label_drop", "seed", "precision"),
    # The weight average is part of what the run computes (evaluation and exports use it).
    **_keys(TRAJECTORY, "train.ema", "decay", "start_step", "warmup"),
    # How parameters are sharded and gathered; a bf16 gradient reduction rounds differently.
    **_keys(FREE, "fsdp", "unit", "reshard_after_forward", "cpu_offload", "hybrid"),
    **_keys(TRAJECTORY, "fsdp", "reduce_dtype"),
    # The ZeRO stage partitions state; an expert JSON may set anything, so a different one is not taken on trust.
    **_keys(FREE, "deepspeed", "stage"),
    **_keys(TRAJECTORY, "deepspeed", "config"),
    # Evaluation and sampling draw from generators of their own, never from the training noise streams.
    **_keys(FREE, "eval", "every", "at_start", "batch_size", "max_images", "inception_weights",
            "weights"),
    **_keys(FREE, "sample", "every", "num", "guidance", "attn_temp", "annealed", "denoise", "seed", "method", "tol",
            "max_iters", "window"),
    **_keys(FREE, "logging", "every", "progress", "run_name", "wandb", "wandb_project", "wandb_mode", "wandb_entity",
            "wandb_group", "wandb_tags", "tensorboard", "tensorboard_dir", "peak_flops"),
    # checkpoint.uri and train.run_dir: checkpoints copied elsewhere continue there.
    **_keys(FREE, "checkpoint", "every", "uri", "keep", "keep_every", "async_upload"),
    **_keys(FREE, "preemption", "signals", "exit_code", "time_limit_minutes"),
}


def config_values(cfg: Config) -> dict[str, Any]:
    """Every leaf key of a config (``section.key``) → its plain value (lists stay lists)."""
    def walk(node: dict, prefix: str):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from walk(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    return dict(walk(OmegaConf.to_container(OmegaConf.structured(cfg)), ""))


@dataclass(frozen=True)
class ConfigChange:
    key: str
    before: Any  # in the checkpoint's config
    after: Any   # in this run's
    kind: str    # FREE | TRAJECTORY | MODEL

    def describe(self, arrow: bool = False) -> str:
        if arrow:
            return f"{self.key} {self.before!r} → {self.after!r}"
        return f"{self.key} = {self.before!r} there, {self.after!r} here"


def kind_of(key: str) -> str:
    try:
        return RESUME_KINDS[key]
    except KeyError:
        raise LookupError(f"config key {key!r} is not classified in trainer/resume_policy.py RESUME_KINDS; add it as "
                          f"FREE, TRAJECTORY or MODEL") from None


def config_changes(saved: Config, current: Config) -> list[ConfigChange]:
    """The keys whose values differ between the checkpoint's config and this run's, in the config's order."""
    before, after = config_values(saved), config_values(current)
    return [ConfigChange(key, before[key], after[key], kind_of(key)) for key in after if before[key] != after[key]]


def check_resume(changes: list[ConfigChange], current: Config, step: int, where: str) -> None:
    """Raise unless ``current`` may continue the checkpoint at ``step`` in ``where``: a different model is a
    CheckpointError (its weights cannot load), a trajectory change without ``train.resume_changes=allow`` a
    ConfigError. Both list every differing key with both values, and say how to go on."""
    model = [c for c in changes if c.kind == MODEL]
    others = [c for c in changes if c.kind != MODEL]
    trajectory = [c for c in changes if c.kind == TRAJECTORY]
    here = f"the checkpoint at step {step} in {where}"
    if model:
        also = f" (and {', '.join(c.describe() for c in others)})" if others else ""
        raise CheckpointError(
            f"{here} is of a different model: {', '.join(c.describe() for c in model)}{also}; its weights cannot "
            f"load into this model, so not even train.resume_changes=allow continues it: {_new_run(current)} to "
            f"train this model, or restore the model.* values to continue the run")
    if trajectory and current.train.resume_changes != "allow":
        raise ConfigError(
            f"{here} was written under another config: {', '.join(c.describe() for c in changes)}; "
            f"what the run computes depends on {', '.join(c.key for c in trajectory)}, so nothing was written. Either "
            f"{_new_run(current)} to start a new run, or add train.resume_changes=allow to continue this one under "
            f"the new values from step {step} on (the change is recorded in the run's {CONFIG_HISTORY_FILE})")


def _new_run(cfg: Config) -> str:
    """How to start afresh instead: what decides which checkpoint this run continues."""
    if cfg.train.resume not in ("auto", "never"):
        return "leave out train.resume (and use a new train.run_dir)"
    if cfg.checkpoint.uri:
        return "use a new train.run_dir and checkpoint.uri"
    return "use a new train.run_dir"


def change_note(changes: list[ConfigChange], step: int) -> str:
    """The one line a continued run prints about what changed since its checkpoint."""
    free = [c.describe(arrow=True) for c in changes if c.kind == FREE]
    allowed = [c.describe(arrow=True) for c in changes if c.kind == TRAJECTORY]
    parts = [", ".join(free)] if free else []
    if allowed:
        parts.append(f"by train.resume_changes=allow: {', '.join(allowed)}")
    return f"note: continuing from step {step} under changed settings: {'; '.join(parts)} (see {CONFIG_HISTORY_FILE})"


# ---------------------------------------------------------------- the history of a run's configs
def history_entry(step: int, cfg: Config, changes: list[ConfigChange]) -> dict:
    """The steps from ``step`` on ran under ``cfg`` (until the next entry): its hash, what changed since the
    previous entry (``key: [before, after]``), and which of those changes were opted into."""
    return {"from_step": step, "config_hash": config_hash(cfg),
            "changes": {c.key: [c.before, c.after] for c in changes},
            "opted_in": [c.key for c in changes if c.kind == TRAJECTORY]}


def continued_history(history: list[dict], saved: Config, step: int, cfg: Config,
                      changes: list[ConfigChange]) -> list[dict]:
    """The history of a run continued from ``step`` under ``cfg``. Checkpoints from before histories were kept start
    theirs with the config they were saved under, the best record of how their steps ran."""
    history = list(history) or [history_entry(0, saved, [])]
    return history + [history_entry(step, cfg, changes)] if changes else history


def history_jsonl(history: list[dict]) -> str:
    return "".join(json.dumps(entry) + "\n" for entry in history)
