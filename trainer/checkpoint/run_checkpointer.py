"""The run checkpointer: "resume" and "save" for the training loop, one call each.

It finds the checkpoint to continue (``train.resume``: auto, never, or a checkpoint's URI), asks the strategy
whether it can load that manifest, decides whether this config may continue it (``trainer.resume_policy``: the same
model, and no change to what the run computes unless ``train.resume_changes=allow``), and restores the strategy, the
run state, the RNG streams and every resumable component (the loader, the metric window) together. A refusal is the
same error on every rank and leaves the run directory as it was: the loop writes nothing before ``resume`` returns.
Saving gathers the same pieces and hands them to the checkpoint manager's commit protocol. The loop never names a
format.
"""

from __future__ import annotations

import io
import shutil
import warnings
from pathlib import Path
from typing import Protocol

import torch

from cluster.env import ProcessEnv
from cluster.run_contract import read_summary

from ..config import Config, ConfigError, config_hash, from_yaml_text, to_yaml
from ..distributed import barrier, gather_objects
from ..resume_policy import ConfigChange, change_note, check_resume, config_changes, continued_history, history_entry
from ..run_state import RunState, capture_rng, restore_rng, seed_everything
from ..stores import StoreError, open_store
from ..strategies import Strategy
from .files import CheckpointError, load_torch_file
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
        self.finished = False  # set by resume(): the run had reached train.steps and ended; nothing is left to do
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
        loader, metric window and RNG streams restored in place; ``finished`` says whether the run had already
        reached ``train.steps`` and done its end (nothing is left to do). Refused (a CheckpointError or ConfigError,
        the same on every rank): nothing is left behind."""
        cache = self.run_dir / ".checkpoint-cache"
        created = _missing_dirs(cache)  # what the download makes, so that a refusal can take it away again
        restored = self._find()
        if restored is None:
            return RunState(config_history=[history_entry(0, self.cfg, [])])
        manifest, directory = restored
        where = self.manager if self.cfg.train.resume == "auto" else self.cfg.train.resume
        try:
            saved, saved_cfg, changes = self._check(manifest, directory, where)
            refusal = None
        except (CheckpointError, ConfigError) as e:
            refusal = e
        # Every rank read the same files and config, so every rank decided alike; gathering the decisions also
        # waits until every rank is done reading before the cache is removed.
        refusals = [r for r in self.manager.ranks.all_gather(refusal) if r is not None]
        if refusals:
            if self.env.local_rank == 0:
                _remove(directory, created)
            raise refusals[0]
        self.strategy.load_state(directory)
        state = RunState.from_dict(saved["run"])
        # Rank 0 holds the run directory (other nodes may not see it), so its answer is everybody's.
        self.finished = self.manager.ranks.from_rank0(
            self.env.is_main and state.step >= self.cfg.train.steps and _ended(self.run_dir, state.step))
        if not self.finished:  # a finished run starts no new segment: nothing runs under this config
            state.config_history = continued_history(state.config_history, saved_cfg, state.step, self.cfg, changes)
        loader.load_state_dict(state.loader)
        window.load_state_dict(state.metric_window)
        self._restore_rng(state)
        self.last_saved_step = state.step
        barrier()
        if self.env.local_rank == 0:
            # A finished run leaves nothing behind; a continuing one keeps the run directory it is about to write.
            _remove(directory, created if self.finished else [d for d in created if self.run_dir in d.parents])
        if self.env.is_main:
            print(self._outcome(state.step, changes, where), flush=True)
        return state

    def _check(self, manifest: Manifest, directory: Path, where) -> tuple[dict, Config, list[ConfigChange]]:
        """The saved run file, its config and the changes since, if this run may continue the checkpoint; else
        raise."""
        reason = self.strategy.can_resume(manifest, self.env.world_size)
        if reason:
            raise CheckpointError(f"the checkpoint at step {manifest.step} in {where} {reason}")
        saved = load_torch_file(directory / RUN_FILE)
        saved_cfg = from_yaml_text(saved["config_yaml"])
        changes = config_changes(saved_cfg, self.cfg)
        check_resume(changes, self.cfg, manifest.step, str(where))
        return saved, saved_cfg, changes

    def _outcome(self, step: int, changes: list[ConfigChange], where) -> str:
        steps = self.cfg.train.steps
        if self.finished:
            reached = "reached" if step == steps else "is past"
            return (f"already finished: the checkpoint at step {step} in {where} {reached} train.steps={steps}; "
                    f"nothing to do (raise train.steps to train further)")
        note = f"{change_note(changes, step)}\n" if changes else ""
        return f"{note}resumed from step {step} ({where})"

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
        try:
            return explicit.restore(step, cache, required=True)
        except CheckpointError as e:
            raise CheckpointError(f"train.resume: {e}") from None

    # ---------------------------------------------------------------- the decision alone (dry run)
    def decide(self) -> str:
        """What ``resume()`` would do, decided read-only (``tarflow train --dry-run``): nothing is downloaded into the
        run directory and nothing is written. Returns the line saying so; a refusal raises the error ``resume()``
        would raise. Checkpoints are checked against their manifests by listing (presence and size); ``resume()``
        also compares every file's sha256 as it downloads it."""
        found = self._find_verified()
        if found is None:
            why = "train.resume=never" if self.cfg.train.resume == "never" else f"no checkpoint in {self.manager}"
            return f"start fresh at step 0 ({why})"
        manifest, store, where = found
        reason = self.strategy.can_resume(manifest, self.env.world_size)
        if reason:
            raise CheckpointError(f"the checkpoint at step {manifest.step} in {where} {reason}")
        key = f"{step_name(manifest.step)}/{RUN_FILE}"
        try:
            data = store.get_bytes(key, expected_sha256=manifest.files.get(RUN_FILE, {}).get("sha256"))
        except StoreError as e:
            raise CheckpointError(f"cannot read {store.uri_for(key)}: {e}") from None
        saved = load_torch_file(io.BytesIO(data), shown_as=store.uri_for(key))
        changes = config_changes(from_yaml_text(saved["config_yaml"]), self.cfg)
        check_resume(changes, self.cfg, manifest.step, str(where))
        step, steps = saved["run"]["step"], self.cfg.train.steps
        if step >= steps and _ended(self.run_dir, step):
            return (f"nothing to do: the checkpoint at step {step} in {where} reached train.steps={steps} and the run "
                    f"ended (raise train.steps to train further)")
        note = f"; {change_note(changes, step)}" if changes else ""
        return f"resume from step {step} ({where}){note}"

    def _find_verified(self) -> tuple[Manifest, object, object] | None:
        """``_find`` without downloading: (manifest, store, where) of the checkpoint ``resume()`` would restore."""
        resume = self.cfg.train.resume
        if resume == "never":
            return None
        if resume == "auto":
            steps = self.manager.steps()
            for step in reversed(steps):
                try:
                    return self.manager.verify(step, deep=False), self.manager.store, self.manager
                except CheckpointError as e:
                    warnings.warn(f"skipping checkpoint {self.manager.store.uri_for(step_name(step))}: {e}",
                                  stacklevel=2)
            if steps:
                raise CheckpointError(f"{self.manager.store.uri_for('')} holds checkpoints at steps {steps} but none "
                                      f"verifies; move them away to start over, or point train.resume at a good one")
            return None
        root, step = split_checkpoint_uri(resume)
        if step is None:
            raise CheckpointError(f"train.resume={resume!r}: expected auto, never, or a checkpoint's URI ending in "
                                  f"step-NNNNNNNN")
        explicit = CheckpointManager(open_store(root), self.run_dir / ".checkpoint-staging", self.manager.ranks)
        if step not in explicit.steps():
            raise CheckpointError(f"train.resume={resume!r}: {explicit.store.uri_for(step_name(step))} has no "
                                  f"manifest (not a complete checkpoint)")
        return explicit.verify(step, deep=False), explicit.store, resume

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
                            config_hash=run["config_hash"], weight_average=self.strategy.ema is not None)

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
                                                     "checkpoint/blocked_seconds": result.blocked_seconds,
                                                     "checkpoint/bytes": result.bytes}}
        if required:
            raise CheckpointError(result.error)
        warnings.warn(f"{result.error}; training goes on, the previous checkpoint is intact", stacklevel=2)
        return {"step": result.step, "metrics": {"checkpoint/failed_step": result.step}}

    def poll(self) -> dict | None:
        """The record of a save that was committed and not reported yet, without waiting for one still in flight
        (so the loop reports a save soon after it is committed, not when the next save starts). A failed save is
        left to ``finish``: a warning at the next save, an error when it was the last one."""
        if self.manager.in_flight:
            return None
        result = self.manager.wait()  # done: returns at once
        if result is None or result.reported or not result.committed:
            return None
        return self.finish(required=False)

    def wait(self) -> None:
        """Never leave while an upload is in flight."""
        self.manager.wait()


def _ended(run_dir: Path, step: int) -> bool:
    """The run's end (final evaluation, samples, summary) was done at ``step``. A run stopped at its last step by a
    preemption, or continued from checkpoints copied elsewhere, has not done it yet and does it on resuming."""
    summary = read_summary(run_dir)
    return bool(summary) and summary.get("step") == step and not summary.get("preempted")


def _missing_dirs(path: Path) -> list[Path]:
    """``path`` and those of its parents that do not exist yet, innermost first."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def _remove(directory: Path, created: list[Path]) -> None:
    """The downloaded checkpoint, then each of ``created`` (innermost first) that is empty now."""
    shutil.rmtree(directory, ignore_errors=True)
    for path in created:
        try:
            path.rmdir()
        except OSError:  # not empty (someone else's files), or already gone
            pass
