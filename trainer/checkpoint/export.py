"""Reading checkpoints outside training, in one process: find one by URI, verify it, consolidate its model.

A URI names a checkpoint (``…/step-NNNNNNNN``), a checkpoint root (its newest complete checkpoint), or a one-file
model export (``.pt``)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import NamedTuple

import torch

from ..config import Config, from_yaml_text
from ..stores import StoreError, open_store
from .files import FORMAT_VERSION, CheckpointError, atomic_torch_save, load_checkpoint_file, load_torch_file
from .manager import CheckpointManager, Ranks
from .manifest import RUN_FILE, Manifest, split_checkpoint_uri


def locate(uri: str) -> tuple[CheckpointManager, list[int]]:
    """The manager of the store holding the checkpoint(s) and their steps: the one the URI names, or every
    complete one under a root (ascending)."""
    root, step = split_checkpoint_uri(uri)
    manager = _manager(root)
    if step is not None:
        return manager, [step]
    steps = manager.steps()
    if not steps:
        raise CheckpointError(f"no complete checkpoint (a step-NNNNNNNN/ prefix with a manifest) under {uri}")
    return manager, steps


def _manager(uri: str) -> CheckpointManager:
    return CheckpointManager(open_store(uri), Path(tempfile.gettempdir()), Ranks())


class ConsolidatedModel(NamedTuple):
    state: dict[str, torch.Tensor]  # the model's full fp32 state dict
    config: Config                  # the run's
    step: int
    weights: str                    # which weights ``state`` holds: "ema" (the run's average) or "raw" (as trained)


def consolidated_model(uri: str, weights: str | None = None) -> ConsolidatedModel:
    """The model of any strategy's checkpoint or an export, with ``weights``: "ema" (the weight average; an error
    when the checkpoint has none), "raw" (as trained), or None: the average when the checkpoint holds one."""
    if Path(uri).is_file():
        state = load_checkpoint_file(uri)
        held = state.get("weights", "raw")  # an export holds one of the two, and says which
        if weights not in (None, held):
            raise CheckpointError(f"{uri} holds the {_WEIGHTS[held]} only, not the {_WEIGHTS[weights]}; export it "
                                  f"again from the checkpoint with --weights {weights}")
        return ConsolidatedModel(state["model"], from_yaml_text(state["config_yaml"]), state.get("step", 0), held)
    from ..strategies import CHECKPOINT_FORMATS

    manager, steps = locate(uri)
    step = steps[-1]
    with tempfile.TemporaryDirectory(prefix="tarflow-ckpt-") as tmp:
        manifest, directory = manager.restore(step, Path(tmp), required=True)
        run = load_torch_file(directory / RUN_FILE)
        # The manifest says whether the strategy's files hold an average: one export, whichever is asked for.
        if weights == "ema" and not manifest.weight_average:
            raise CheckpointError(f"the checkpoint {manager.store.uri_for(f'step-{step:08d}')} holds no weight "
                                  f"average (its run had train.ema.decay=0); use the trained weights (--weights raw "
                                  f"or eval.weights=raw)")
        used = "ema" if weights in (None, "ema") and manifest.weight_average else "raw"
        model = CHECKPOINT_FORMATS[manifest.checkpoint_format].export_model_state(directory, used)
        if model is None:
            raise CheckpointError(f"the checkpoint {manager.store.uri_for(f'step-{step:08d}')}'s manifest lists a "
                                  f"weight average its files do not hold; export it with --weights raw")
        return ConsolidatedModel(model, from_yaml_text(run["config_yaml"]), step, used)


_WEIGHTS = {"ema": "weight average (ema)", "raw": "trained weights (raw)"}


def save_model_file(state: dict[str, torch.Tensor], cfg: Config, step: int, out: Path, weights: str = "raw") -> Path:
    """A one-file model export (``.pt``) that every command taking a checkpoint URI reads; ``weights`` says which
    it holds (ema | raw)."""
    from ..config import config_hash, to_yaml

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save({"format": FORMAT_VERSION, "step": step, "model": state, "config_yaml": to_yaml(cfg),
                       "config_hash": config_hash(cfg), "weights": weights}, out)
    return out


def listing(uri: str) -> list[dict]:
    """Every step prefix under a checkpoint root: step, complete or not, files, bytes, strategy, world size, whether
    it holds a weight average."""
    manager = _manager(uri)
    rows = []
    for step, complete in sorted(manager.prefixes().items()):
        row = {"step": step, "complete": complete}
        if complete:
            m: Manifest = manager.manifest(step)
            row.update(strategy=m.strategy, world_size=m.world_size, files=len(m.files),
                       bytes=sum(f["size"] for f in m.files.values()), config_hash=m.config_hash,
                       weight_average=m.weight_average)
        rows.append(row)
    return rows


def verify(uri: str) -> list[tuple[int, str | None]]:
    """(step, None when it verifies, else why not) for the checkpoint the URI names, or every one under a root."""
    manager, steps = locate(uri)
    results = []
    for step in steps:
        try:
            manager.verify(step, deep=True)
            results.append((step, None))
        except (CheckpointError, StoreError) as e:
            results.append((step, str(e)))
    return results
