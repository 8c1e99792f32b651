"""The commit protocol, once, on top of any store.

Save (every rank):  the strategy writes this rank's files into a local staging directory (the only time training
waits) → a background thread uploads them → all ranks report to rank 0 (a gloo group of its own, so the commit never
interleaves with training collectives) → rank 0 writes the manifest last, only if every rank's upload succeeded →
retention. The next save, and the end of the process, wait for the upload in flight.

Load: the newest prefix with a manifest; every file downloaded once per node and verified against the manifest's
size and sha256; a checkpoint that fails is skipped with a warning naming it, and the one before it is tried.
Retention deletes the manifest first, so an interrupted deletion leaves nothing that looks complete.
"""

from __future__ import annotations

import shutil
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch.distributed as dist

from ..stores import Store, StoreError
from .files import CheckpointError
from .manifest import MANIFEST, Manifest, parse_step, step_name


@dataclass
class SaveResult:
    step: int
    committed: bool
    error: str | None
    blocked_seconds: float  # training waited this long (staging)
    total_seconds: float    # staging + upload + commit
    bytes: int = 0          # uploaded by all ranks (the files the manifest lists)
    reported: bool = False  # the loop has logged it


@dataclass(frozen=True)
class Ranks:
    """Who takes part: the commit group is a gloo group made once by every rank (None with one process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    group: object | None = None

    @classmethod
    def current(cls, local_rank: int = 0) -> "Ranks":
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return cls()
        return cls(dist.get_rank(), dist.get_world_size(), local_rank, dist.new_group(backend="gloo"))

    def all_gather(self, obj) -> list:
        if self.group is None:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def from_rank0(self, obj):
        if self.group is None:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


class CheckpointManager:
    def __init__(self, store: Store, staging_dir: Path, ranks: Ranks, keep: int = 2, keep_every: int = 0,
                 async_upload: bool = True):
        self.store, self.staging_dir, self.ranks = store, Path(staging_dir), ranks
        self.keep, self.keep_every, self.async_upload = keep, keep_every, async_upload
        self._thread: threading.Thread | None = None
        self._result: SaveResult | None = None

    def __repr__(self) -> str:
        return self.store.uri_for("")

    # ---------------------------------------------------------------- finding
    def steps(self) -> list[int]:
        """Steps with a manifest (complete checkpoints), ascending."""
        return sorted(s for s, complete in self.prefixes().items() if complete)

    def prefixes(self) -> dict[int, bool]:
        """Every step prefix in the store → whether it holds a manifest."""
        found: dict[int, bool] = {}
        for info in self.store.list("step-"):
            name, _, rest = info.key.partition("/")
            step = parse_step(name)
            if step is not None:
                found[step] = found.get(step, False) or rest == MANIFEST
        return found

    def manifest(self, step: int) -> Manifest:
        key = f"{step_name(step)}/{MANIFEST}"
        try:
            return Manifest.from_json(self.store.get_bytes(key), self.store.uri_for(key))
        except StoreError as e:
            raise CheckpointError(f"cannot read {self.store.uri_for(key)}: {e}") from None

    def verify(self, step: int, deep: bool = True) -> Manifest:
        """Every file the manifest lists is present at its size (``deep``: and its sha256)."""
        manifest = self.manifest(step)
        prefix = f"{step_name(step)}/"
        present = {i.key[len(prefix):]: i.size for i in self.store.list(prefix)}
        for rel, info in manifest.files.items():
            where = self.store.uri_for(prefix + rel)
            if rel not in present:
                raise CheckpointError(f"{where} is listed in the manifest but missing")
            if present[rel] != info["size"]:
                raise CheckpointError(f"{where} has {present[rel]} bytes, the manifest says {info['size']}")
            if deep:
                try:
                    self.store.get_bytes(prefix + rel, expected_sha256=info["sha256"])
                except StoreError as e:
                    raise CheckpointError(str(e)) from None
        return manifest

    # ---------------------------------------------------------------- saving
    def save(self, step: int, write: Callable[[Path], None], manifest: Manifest) -> float:
        """Collective. ``write(directory)`` puts this rank's files into its staging directory (the strategy's
        state; on rank 0 also the run state). Returns the seconds training was blocked; the upload and commit go on
        in the background unless ``async_upload`` is off."""
        self.wait()
        started = time.perf_counter()
        stage = self.staging_dir / step_name(step) / f"rank-{self.ranks.rank}"
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(parents=True)
        write(stage)
        blocked = time.perf_counter() - started
        self._result = None
        self._thread = threading.Thread(target=self._upload_and_commit, name=f"checkpoint-{step}",
                                        args=(step, stage, manifest, started, blocked))
        self._thread.start()  # not a daemon: the interpreter does not exit while an upload is pending
        if not self.async_upload:
            self.wait()
        return blocked

    @property
    def in_flight(self) -> bool:
        """A save's upload is still running (asking does not wait for it)."""
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> SaveResult | None:
        """Wait for the save in flight (if any); its result."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        return self._result

    def _upload_and_commit(self, step: int, stage: Path, manifest: Manifest, started: float, blocked: float):
        name = step_name(step)
        files, error = {}, None
        try:
            for path in sorted(p for p in stage.rglob("*") if p.is_file()):
                rel = path.relative_to(stage).as_posix()
                info = self.store.put_file(f"{name}/{rel}", path)
                files[rel] = {"size": info.size, "sha256": info.sha256}
        except Exception as e:  # reported by rank 0 below; the checkpoint is then simply not committed
            error = f"rank {self.ranks.rank}: {type(e).__name__}: {e}"
        reports = self.ranks.all_gather((files, error))
        outcome = None
        if self.ranks.rank == 0:
            outcome = self._commit(step, manifest, reports)
        outcome = self.ranks.from_rank0(outcome)
        shutil.rmtree(stage, ignore_errors=True)
        try:
            stage.parent.rmdir()  # the step's staging directory, once every local rank has cleared its part
        except OSError:
            pass
        uploaded = sum(info["size"] for rank_files, _ in reports for info in rank_files.values())
        self._result = SaveResult(step, outcome is None, outcome, blocked, time.perf_counter() - started, uploaded)

    def _commit(self, step: int, manifest: Manifest, reports: list) -> str | None:
        """Rank 0: the manifest goes up last, only if every rank uploaded all its files. Returns an error or None."""
        errors = [error for _, error in reports if error]
        files: dict[str, dict] = {}
        for rank_files, _ in reports:
            clash = set(files) & set(rank_files)
            if clash:
                errors.append(f"two ranks wrote the same file(s) {sorted(clash)}")
            files.update(rank_files)
        if errors:
            return f"checkpoint {self.store.uri_for(step_name(step))} not committed: {'; '.join(errors)}"
        manifest.files = files
        try:
            self.store.put_bytes(f"{step_name(step)}/{MANIFEST}", manifest.to_json())
        except Exception as e:
            return f"checkpoint {self.store.uri_for(step_name(step))} not committed: manifest: {e}"
        try:
            self._retain(step)
        except Exception as e:  # the new checkpoint is complete; old ones are left for the next retention pass
            warnings.warn(f"checkpoint retention under {self.store.uri_for('')} failed: {e}", stacklevel=1)
        return None

    def _retain(self, newest: int) -> None:
        """Keep the newest ``keep`` complete checkpoints, every ``keep_every``-th step, and everything at or after
        ``newest``; prefixes without a manifest older than ``newest`` are leftovers of failed saves or deletions."""
        prefixes = self.prefixes()
        complete = sorted(s for s, c in prefixes.items() if c and s <= newest)
        kept = set(complete[-self.keep:]) | {s for s in complete if self.keep_every and s % self.keep_every == 0}
        doomed = [s for s in complete if s not in kept] + [s for s, c in prefixes.items() if not c and s < newest]
        for step in sorted(doomed):
            name = step_name(step)
            self.store.delete([f"{name}/{MANIFEST}"])  # first: from here on it no longer looks complete
            self.store.delete([i.key for i in self.store.list(f"{name}/")])

    # ---------------------------------------------------------------- loading
    def restore(self, step: int, cache_dir: Path, required: bool = False) -> tuple[Manifest, Path] | None:
        """Collective. Download (once per node) and verify checkpoint ``step`` into ``cache_dir``. If any rank could
        not: a ``CheckpointError`` naming the checkpoint and the reason when ``required`` (a checkpoint the user
        named), else a warning and None on every rank (the caller tries an older one)."""
        name = step_name(step)
        local = Path(cache_dir) / name
        manifest, error = None, None
        try:
            manifest = self.manifest(step)
            if self.ranks.local_rank == 0:
                for rel, info in manifest.files.items():
                    target = local / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    self.store.get_file(f"{name}/{rel}", target, expected_sha256=info["sha256"],
                                        expected_size=info["size"])
        except (CheckpointError, StoreError, OSError) as e:
            error = str(e)
        errors = [e for e in self.ranks.all_gather(error) if e]
        if errors and required:
            raise CheckpointError(f"cannot restore checkpoint {self.store.uri_for(name)}: {errors[0]}")
        if errors:
            warnings.warn(f"skipping checkpoint {self.store.uri_for(name)}: {errors[0]}", stacklevel=2)
            return None
        return manifest, local

    def restore_latest(self, cache_dir: Path) -> tuple[Manifest, Path] | None:
        """The newest checkpoint that verifies; None if there is none. Checkpoints exist but none verifies: an
        error (starting over would write new checkpoints among the broken ones)."""
        steps = self.ranks.from_rank0(self.steps() if self.ranks.rank == 0 else None)
        for step in reversed(steps):
            restored = self.restore(step, cache_dir)
            if restored is not None:
                return restored
        if steps:
            raise CheckpointError(f"{self.store.uri_for('')} holds checkpoints at steps {steps} but none verifies; "
                                  f"move them away to start over, or point train.resume at a good one")
        return None

