"""mosaicml-streaming, adapted: the ``StreamingDataset`` subclass the MDS loader reads through (decoding in the
workers, download errors raised instead of a silently short epoch), the worker-side helpers, and streaming's view of
the machine: ranks from the environment, the shared cache directory, stale shared memory.

Overrides ``StreamingDataset._resume_incr_epoch``, ``on_exception``, ``__iter__`` and ``get_item`` and reads
``spanner``, ``shards``, ``streams`` and ``_downloader``: internals of mosaicml-streaming 0.13 (pinned in
pyproject.toml). Imports streaming only when a dataset is built.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .codecs import CorruptSampleError, decode_image
from .storage import DataSourceError, join
from .transforms import ImageTransform

logger = logging.getLogger(__name__)


# -- helpers that run in the DataLoader workers (module level: picklable) ----------------------------------------------
@dataclass(frozen=True)
class SampleDecoder:
    """MDS row → transformed image, or the reason it is corrupt (errors travel as data, so that the main process
    raises ``CorruptSampleError`` itself whatever the number of workers, or skips and counts)."""

    encoding: str
    shape: tuple[int, int, int]
    num_classes: int
    transform: ImageTransform
    seed: int

    def __call__(self, row: dict[str, Any], shard: str, position: str, epoch: int) -> dict[str, Any]:
        key = row.get("key") if isinstance(row.get("key"), str) else position
        try:
            image = decode_image(row["image"], self.encoding, self.shape, shard, key)
            if not image.flags.writeable:  # PIL hands out read-only arrays; torch wants writable ones
                image = image.copy()
            label = int(row["label"])
            if self.num_classes and not 0 <= label < self.num_classes:
                raise CorruptSampleError(f"label {label} is outside [0, {self.num_classes})", shard, key)
            pixels = self.transform(image, seed=self.seed, epoch=epoch, key=key)
        except CorruptSampleError as e:
            return {"key": key, "error": (str(e.args[0]).rsplit(" (shard ", 1)[0], e.shard, e.key)}
        except (KeyError, TypeError, ValueError) as e:  # a row without our columns, a label that is no int
            return {"key": key, "error": (f"unreadable sample: {type(e).__name__}: {e}", shard, key)}
        return {"key": key, "image": pixels, "label": label, "error": None}


@dataclass(frozen=True)
class Collate:
    out_shape: tuple[int, int, int]

    def __call__(self, items: list[dict[str, Any]]):
        good = [it for it in items if it["error"] is None]
        images = torch.stack([it["image"] for it in good]) if good else torch.empty((0, *self.out_shape))
        labels = torch.tensor([it["label"] for it in good], dtype=torch.int64)
        return images, labels, [it["key"] for it in good], [it["error"] for it in items if it["error"] is not None]


def worker_init(_worker_id: int) -> None:
    # Workers are forked: a boto3 client (and its sockets) copied from the parent must not be shared between
    # processes, so streaming's downloaders start with a fresh client here.
    info = torch.utils.data.get_worker_info()
    dataset = getattr(info.dataset, "streaming", info.dataset)
    for stream in getattr(dataset, "streams", []):
        stream._downloader.clean_up()


_DATASET_CLASS = None


def streaming_dataset_class():
    """Defined on first use, so that importing this module does not import streaming (and transformers); still
    picklable by name for spawned workers through the module ``__getattr__`` below."""
    global _DATASET_CLASS
    if _DATASET_CLASS is not None:
        return _DATASET_CLASS
    from streaming import StreamingDataset

    class _DecodingStreamingDataset(StreamingDataset):
        """StreamingDataset whose samples are decoded and transformed where they are read (the workers)."""

        def __init__(self, *, decoder: SampleDecoder, remote_split: str, **kwargs):
            super().__init__(**kwargs)
            self.decoder = decoder
            self.remote_split = remote_split
            self.transform_epoch = 0  # set by the loader before each epoch; workers get a copy
            self._background_error: BaseException | None = None

        def _resume_incr_epoch(self):
            epoch, sample_in_epoch = super()._resume_incr_epoch()
            if epoch != self.transform_epoch:  # our epoch and streaming's must never drift apart
                raise RuntimeError(f"internal error: streaming started epoch {epoch}, the loader is in epoch "
                                   f"{self.transform_epoch}")
            return epoch, sample_in_epoch

        def on_exception(self, future) -> None:
            # streaming's download threads stop the epoch early without an error in the iterating thread; keep
            # the error so that __iter__ can raise it after streaming's generator has ended.
            if future.exception() is not None and self._background_error is None:
                self._background_error = future.exception()
            super().on_exception(future)

        def __iter__(self):
            self._background_error = None
            yield from super().__iter__()
            if self._background_error is not None:
                e = self._background_error
                raise DataSourceError(f"reading shards of {self.remote_split} failed: {type(e).__name__}: {e}")

        def get_item(self, sample_id: int, retry: int = 7):
            shard_id, index_in_shard = self.spanner[sample_id]
            shard = self.shards[shard_id].file_pairs[0][0].basename
            try:
                row = super().get_item(sample_id, retry)
            except (OSError, RuntimeError) as e:  # download failed, shard vanished, background thread died
                raise DataSourceError(f"cannot read {join(self.remote_split, shard)} (sample {sample_id}): "
                                      f"{type(e).__name__}: {e}") from None
            except Exception as e:  # the shard's bytes do not parse as MDS at this sample
                return {"key": f"#{index_in_shard}",
                        "error": (f"unreadable MDS sample: {type(e).__name__}: {e}", shard, f"#{index_in_shard}")}
            return self.decoder(row, shard, f"#{index_in_shard}", self.transform_epoch)

    _DecodingStreamingDataset.__module__ = __name__
    _DecodingStreamingDataset.__qualname__ = "_DecodingStreamingDataset"
    _DATASET_CLASS = _DecodingStreamingDataset
    return _DATASET_CLASS


def __getattr__(name: str):
    if name == "_DecodingStreamingDataset":
        return streaming_dataset_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class Positions(torch.utils.data.Dataset):
    """Random access to chosen samples of a StreamingDataset (the heldout path)."""

    def __init__(self, streaming, positions: np.ndarray):
        self.streaming = streaming
        self.positions = positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int):
        return self.streaming[int(self.positions[i])]


# -- shared memory, environment, cache ---------------------------------------------------------------------------------
_SHM_CLEANED = False


def clean_stale_shared_memory() -> int:
    """Unlink streaming's shared-memory segments that no live process maps (left by killed runs); returns how many.

    Runs once per process (the first ``MDSLoader`` calls it). Falls back to streaming's own cleaner, which removes
    live segments too, where ``/dev/shm`` and ``/proc`` cannot be read."""
    global _SHM_CLEANED
    if _SHM_CLEANED:
        return 0
    _SHM_CLEANED = True
    from streaming.base.constant import SHM_TO_CLEAN

    shm_dir, proc = Path("/dev/shm"), Path("/proc")
    if not (shm_dir.is_dir() and (proc / "self" / "maps").exists()):
        from streaming.base.util import clean_stale_shared_memory as streaming_clean

        streaming_clean()
        return 0
    pattern = re.compile(r"\d{6}_(" + "|".join(map(re.escape, SHM_TO_CLEAN)) + ")")
    candidates = [p.name for p in shm_dir.iterdir() if pattern.fullmatch(p.name)]
    if not candidates:
        return 0
    mapped: set[str] = set()
    for maps in proc.glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:  # the process ended, or is not ours to read
            continue
        for match in re.finditer(r"/dev/shm/(\S+)", text):
            mapped.add(match.group(1))
    removed = 0
    for name in candidates:
        if name not in mapped:
            try:
                (shm_dir / name).unlink()
                removed += 1
            except OSError:
                pass
    if removed:
        logger.info("removed %d stale streaming shared-memory segments", removed)
    return removed


@dataclass(frozen=True)
class Placement:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @property
    def num_nodes(self) -> int:
        return self.world_size // self.local_world_size


def placement_from_env(rank: int, world_size: int) -> Placement:
    """Make streaming's view of the world (environment variables) agree with our arguments (checked already to
    satisfy 0 <= rank < world_size), or refuse."""
    def env_int(name: str) -> int | None:
        value = os.environ.get(name)
        if value is None or value == "":
            return None
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"environment variable {name}={value!r} is not an integer") from None

    env_rank, env_world = env_int("RANK"), env_int("WORLD_SIZE")
    set_env = env_rank is None and env_world is None and world_size > 1
    if not set_env and (env_rank or 0, env_world or 1) != (rank, world_size):
        raise ValueError(f"MDSLoader(rank={rank}, world_size={world_size}) disagrees with the environment "
                         f"RANK={env_rank} WORLD_SIZE={env_world}, which mosaicml-streaming reads; launch with "
                         "matching values")
    local_world = env_int("LOCAL_WORLD_SIZE")
    local_rank = env_int("LOCAL_RANK")
    if local_world is None:
        if local_rank not in (None, 0):
            raise ValueError(f"LOCAL_RANK={local_rank} is set but LOCAL_WORLD_SIZE is not; set both (torchrun "
                             "does) so that streaming can coordinate the ranks of a machine")
        local_world, local_rank = 1, 0
    local_rank = 0 if local_rank is None else local_rank
    if local_world < 1 or world_size % local_world or not 0 <= local_rank < local_world \
            or rank % local_world != local_rank:
        raise ValueError(f"LOCAL_WORLD_SIZE={local_world}, LOCAL_RANK={local_rank} do not fit rank={rank} of "
                         f"world_size={world_size}: streaming needs the same number of ranks on every machine, "
                         "numbered consecutively (rank % LOCAL_WORLD_SIZE == LOCAL_RANK)")
    if world_size > 1:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(f"MDSLoader with world_size={world_size} needs torch.distributed initialised first: "
                             "streaming synchronises the ranks while it builds a dataset")
        if (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
            raise ValueError(f"torch.distributed has rank {dist.get_rank()} of {dist.get_world_size()}, the "
                             f"loader was given rank {rank} of {world_size}")
    if set_env:  # streaming reads these; set them so that it sees what we were told
        os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(world_size)
    return Placement(rank, world_size, local_rank, local_world)


def shared_temp_dir(placement: Placement) -> str:
    """A fresh temporary cache directory, the same for all ranks of a machine (made by local rank 0)."""
    path = tempfile.mkdtemp(prefix="tarflow-mds-") if placement.local_rank == 0 else ""
    if placement.local_world_size > 1:
        import torch.distributed as dist

        paths: list[Any] = [None] * placement.world_size
        dist.all_gather_object(paths, path)
        path = paths[placement.rank - placement.local_rank]
        if placement.local_rank == 0:
            # The other ranks of the machine may still read it when this loader is closed: remove it when this
            # process ends (training is over by then), not earlier.
            atexit.register(shutil.rmtree, path, True)
    return path

