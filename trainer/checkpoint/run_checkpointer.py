"""The run checkpointer: "resume" and "save" for the training loop, one call each.

It finds the checkpoint to continue (``train.resume``: auto, never, or a checkpoint's URI), asks the strategy
whether it can load that manifest, checks that the checkpoint is of the same model, and restores the strategy, the
run state, the RNG streams and every resumable component (the loader, the metric window) together. Saving gathers
the same pieces and hands them to the checkpoint manager's commit protocol. The loop never names a format.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Protocol

import torch

from cluster.env import ProcessEnv

from ..config import Config, config_hash, from_yaml_text, model_differences, to_yaml
from ..distributed import barrier, gather_objects
from ..run_state import RunState, capture_rng, restore_rng, seed_everything
from ..stores import open_store
from ..strategies import Strategy
from .files import CheckpointError
from .manager import CheckpointManager, Ranks
from .manifest import RUN_FILE, Manifest, split_checkpoint_uri, step_name


class Resumable(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class RunCheckpointer:
    """Built before the strategy's first collective and after the run directory is known; every rank builds one."""

    def __init__(self, cfg: Config, env: ProcessEnv, strategy: Strategy, device: torch.device):
        self.cfg, self.env, self.strategy, self.device = cfg, env, strategy, device
        self.run_dir = Path(cfg.train.run_dir)
        c = cfg.checkpoint
        self.manager = CheckpointManager(
            open_store(c.uri or str(self.run_dir / "checkpoints")), self.run_dir / ".checkpoint-staging",
            Ranks.current(env.local_rank), keep=c.keep, keep_every=c.keep_every, async_upload=c.async_upload)
        self.last_saved_step = -1
        if cfg.train.resume == "never" and self.manager.steps():
            raise ValueError(f"train.resume=never but {self.manager} already holds checkpoints; choose "
                             f"a new train.run_dir (or checkpoint.uri) or resume=auto (refusing to overwrite them)")

    def __repr__(self) -> str:
        return repr(self.manager)

    @property
    def last_uri(self) -> str:
        return self.manager.store.uri_for(step_name(self.last_saved_step))

    # ---------------------------------------------------------------- resume
    def resume(self, loader: Resumable, window: Resumable) -> RunState:
        """Collective. The restored run state (a fresh one when there is nothing to resume), with the strategy,
        loader, metric window and RNG streams restored in place."""
        restored = self._find()
        if restored is None:
            return RunState()
        manifest, directory = restored
        where = self.manager if self.cfg.train.resume == "auto" else self.cfg.train.resume
        reason = self.strategy.can_resume(manifest, self.env.world_size)
        if reason:
            raise CheckpointError(f"the checkpoint at step {manifest.step} in {where} {reason}")
        saved = torch.load(directory / RUN_FILE, map_location="cpu", weights_only=True)
        differences = model_differences(from_yaml_text(saved["config_yaml"]), self.cfg)
        if differences:
            raise CheckpointError(f"the checkpoint at step {manifest.step} in {where} is of a different model: "
                                  + ", ".join(f"{k} = {a!r} there, {b!r} here" for k, (a, b) in differences.items()))
        if saved["config_hash"] != config_hash(self.cfg) and self.env.is_main:
            print(f"note: resuming from a checkpoint written with a different (compatible) config "
                  f"(step {manifest.step})")
        self.strategy.load_state(directory)
        state = RunState.from_dict(saved["run"])
        loader.load_state_dict(state.loader)
        window.load_state_dict(state.metric_window)
        self._restore_rng(state)
        self.last_saved_step = state.step
        barrier()
        if self.env.local_rank == 0:
            shutil.rmtree(directory, ignore_errors=True)
        if self.env.is_main:
            print(f"resumed from step {state.step} ({where})")
        return state

    def _restore_rng(self, state: RunState) -> None:
        rank, world_size = self.env.rank, self.env.world_size
        if len(state.rng) == world_size:
            restore_rng(state.rng[rank], self.device)
            return
        # A different number of ranks: the data position is kept, the noise streams start afresh.
        seed_everything(self.cfg.train.seed + rank + 7919 * state.step)
        if self.env.is_main:
            print(f"note: the checkpoint has RNG states of {len(state.rng)} ranks, this run has "
                  f"{world_size}; noise is re-seeded")

    def _find(self) -> tuple[Manifest, Path] | None:
        """``auto``: the newest complete checkpoint that verifies; ``never``: none; else the one the URI names."""
        resume, cache = self.cfg.train.resume, self.run_dir / ".checkpoint-cache"
        if resume == "never":
            return None
        if resume == "auto":
            return self.manager.restore_latest(cache)
        root, step = split_checkpoint_uri(resume)
        if step is None:
            raise CheckpointError(f"train.resume={resume!r}: expected auto, never, or a checkpoint's URI ending in "
                                  f"step-NNNNNNNN")
        explicit = CheckpointManager(open_store(root), self.run_dir / ".checkpoint-staging", self.manager.ranks)
        restored = explicit.restore(step, cache)
        if restored is None:
            raise CheckpointError(f"train.resume={resume!r} cannot be restored (see the warning above)")
        return restored

    # ---------------------------------------------------------------- save
    def save(self, state: RunState, loader: Resumable, window: Resumable) -> dict | None:
        """Collective. Every rank contributes its RNG state and writes its part of the strategy's state; rank 0
        also the run state. Training waits only for the staging; upload and commit go on in the background.
        Returns the record of the previous save, if it had not been reported yet (see ``finish``)."""
        previous = self.finish(required=False)
        state.loader = loader.state_dict()
        state.rng = gather_objects(capture_rng(self.device))
        state.metric_window = window.state_dict()
        run = {"run": state.to_dict(), "config_yaml": to_yaml(self.cfg), "config_hash": config_hash(self.cfg)}
        manifest = Manifest(step=state.step, strategy=self.cfg.train.strategy,
                            checkpoint_format=self.strategy.checkpoint_format, world_size=self.env.world_size,
                            config_hash=run["config_hash"])

        def write(directory: Path) -> None:
            self.strategy.save_state(directory)
            if self.env.is_main:
                torch.save(run, directory / RUN_FILE)

        self.manager.save(state.step, write, manifest)
        self.last_saved_step = state.step
        return previous

    def finish(self, required: bool) -> dict | None:
        """Wait for the save in flight; returns its record ``{"step", "metrics"}`` once (None when there is nothing
        new). A failed save is a warning mid-run (the previous checkpoint is intact and training goes on), an
        error when it was the last one (``required``)."""
        result = self.manager.wait()
        if result is None or result.reported:
            return None
        result.reported = True
        if result.committed:
            return {"step": result.step, "metrics": {"checkpoint/save_seconds": result.total_seconds,
                                                     "checkpoint/blocked_seconds": result.blocked_seconds}}
        if required:
            raise CheckpointError(result.error)
        warnings.warn(f"{result.error}; training goes on, the previous checkpoint is intact", stacklevel=2)
        return {"step": result.step, "metrics": {"checkpoint/failed_step": result.step}}

    def wait(self) -> None:
        """Never leave while an upload is in flight."""
        self.manager.wait()
