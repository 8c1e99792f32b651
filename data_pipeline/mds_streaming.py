"""mosaicml-streaming, adapted: the ``StreamingDataset`` subclass the MDS loader reads through (whole shard files
mapped once, decoding in the workers, download errors raised instead of a silently short epoch), the worker-side
helpers, streaming's partition as the loader's epoch plan reads it (the epoch's global order, steps per epoch, the
canonical nodes a launch can use, and a check of the plan against ``streaming.base.partition.get_partitions``),
and streaming's view of the machine: ranks from the environment, the shared cache directory, stale shared memory.

What streaming still does: the shuffle and partition of every epoch (``_get_work``, shared by the workers of a
machine), resumption (``state_dict``/``load_state_dict`` and the epoch counter), the local cache and downloads
(``prepare_shard``: locking between workers and ranks, S3, sha1 checks) and the column decoding of a sample
(``MDSReader.decode_sample``). What we do instead: step through a worker's sample ids, download ahead per shard
rather than per sample (``ShardPrefetch``), and take a sample's bytes from the shard file mapped once
(``MappedShards``) rather than opened per sample. Why: bench/data.py's profile of streaming's own ``__iter__``
(its docstring).

Overrides ``StreamingDataset._resume_incr_epoch``, ``__iter__`` and ``get_item`` and reads ``_unique_rank_world``,
``_parallel_rank_world``, ``_get_work``, ``sample_offset_per_shard``, ``spanner``, ``shards``, ``streams`` and
``_downloader``: internals of mosaicml-streaming 0.13 (pinned in pyproject.toml). Imports streaming only when a
dataset is built.
"""

from __future__ import annotations

import atexit
import logging
import mmap
import os
import re
import shutil
import tempfile
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
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
        """→ (images, labels, indices, errors, epochs): the good samples' tensors, the corrupt ones' reasons and
        the epochs the samples were read in (streaming's; the loader checks them against its own)."""
        good = [it for it in items if it["error"] is None]
        images = torch.stack([it["image"] for it in good]) if good else torch.empty((0, *self.out_shape))
        labels = torch.tensor([it["label"] for it in good], dtype=torch.int64)
        indices = torch.tensor([it["index"] for it in good], dtype=torch.int64)
        return (images, labels, indices, [it["error"] for it in items if it["error"] is not None],
                {it["epoch"] for it in items})


def worker_init(_worker_id: int) -> None:
    # Workers are forked: a boto3 client (and its sockets) copied from the parent must not be shared between
    # processes, so streaming's downloaders start with a fresh client here.
    info = torch.utils.data.get_worker_info()
    dataset = getattr(info.dataset, "streaming", info.dataset)
    for stream in getattr(dataset, "streams", []):
        stream._downloader.clean_up()


# -- reading shards: each shard file mapped once per process, downloads ahead per shard --------------------------------
MAX_MAPPED_SHARDS = 512  # per process; far below the kernel's default 65530 mappings, above a shuffle block's shards


class UnreadableShardError(ValueError):
    """A local shard file whose header does not describe the samples index.json lists."""


class MappedShards:
    """The raw MDS files of the shards this process reads, each opened and memory-mapped once.

    streaming's ``MDSReader.get_sample_data`` opens, seeks and closes the shard file for every sample; mapping the
    file once makes a sample two slices of the page cache. A mapping holds no private memory (the kernel's page
    cache backs it), so keeping the shards of an epoch mapped costs address space only; beyond
    ``MAX_MAPPED_SHARDS`` the least recently opened one is closed. Not shared between processes: a copy pickled
    into a spawned worker starts empty."""

    def __init__(self) -> None:
        self._maps: OrderedDict[int, tuple[mmap.mmap, np.ndarray]] = OrderedDict()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, _state: dict) -> None:
        self.__init__()

    def __contains__(self, shard_id: int) -> bool:
        return shard_id in self._maps

    def open(self, shard_id: int, path: str, num_samples: int) -> None:
        """Map ``path``, the raw file of a shard that streaming has made local, and read its offset table.

        The MDS raw layout (``streaming.base.format.mds.writer``): uint32 sample count, uint32 offsets[count + 1]
        (from the file's start), then the samples; the same two offsets ``MDSReader.get_sample_data`` reads. A
        file whose header disagrees with index.json is an ``UnreadableShardError`` (its samples are corrupt)."""
        with open(path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        size, table_end = len(mapped), 4 * (num_samples + 2)
        header = np.frombuffer(mapped[:table_end], np.uint32)  # a copy: the mapping can be closed later
        if len(header) != num_samples + 2 or header[0] != num_samples or header[-1] > size \
                or np.any(np.diff(header[1:].astype(np.int64)) < 0):
            mapped.close()
            raise UnreadableShardError(f"the shard file's header ({size} bytes) does not describe the "
                                       f"{num_samples} samples index.json lists")
        self._maps[shard_id] = mapped, header[1:].astype(np.int64)
        if len(self._maps) > MAX_MAPPED_SHARDS:
            self._maps.popitem(last=False)[1][0].close()

    def sample_bytes(self, shard_id: int, index_in_shard: int) -> bytes:
        mapped, offsets = self._maps[shard_id]
        return mapped[offsets[index_in_shard]:offsets[index_in_shard + 1]]

    def close(self) -> None:
        for mapped, _ in self._maps.values():
            mapped.close()
        self._maps.clear()


class ShardPrefetch:
    """Downloads the shards of one worker's epoch ahead of reading them, one shard at a time, through streaming's
    own ``StreamingDataset.prepare_shard`` (its cache, locking between workers and ranks, S3 downloader, sha1 check).

    Replaces streaming's prepare and ready threads, which walk the epoch sample by sample and poll shared state
    every ``TICK`` under the GIL the decoding needs. Here a shard is submitted once its first sample is at most
    ``ahead`` samples (streaming's ``predownload``) past the sample being read; reading a shard waits for its
    download and raises that download's error, so an error never shortens an epoch silently."""

    def __init__(self, prepare_shard, shard_per_sample: np.ndarray, ahead: int) -> None:
        shards, first = np.unique(shard_per_sample, return_index=True)
        order = np.argsort(first)
        self._shards, self._first = shards[order].tolist(), first[order].tolist()
        self._prepare_shard, self._ahead = prepare_shard, max(1, ahead)
        self._submitted = 0
        self._futures: dict[int, Future] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mds-prefetch")

    def advance(self, position: int) -> None:
        """Submit the shards first needed up to ``ahead`` samples past ``position`` of the epoch."""
        while self._submitted < len(self._shards) and self._first[self._submitted] <= position + self._ahead:
            shard_id = self._shards[self._submitted]
            self._futures[shard_id] = self._executor.submit(self._prepare_shard, shard_id)
            self._submitted += 1

    def wait(self, shard_id: int) -> None:
        """Block until ``shard_id`` is local; a shard outside this epoch's plan is prepared here."""
        future = self._futures.get(shard_id)
        if future is None:
            self._prepare_shard(shard_id)
        else:
            future.result()  # raises the download's error

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)  # a download under way completes in its thread


_DATASET_CLASS = None


def streaming_dataset_class():
    """Defined on first use, so that importing this module does not import streaming (and transformers); still
    picklable by name for spawned workers through the module ``__getattr__`` below."""
    global _DATASET_CLASS
    if _DATASET_CLASS is not None:
        return _DATASET_CLASS
    from streaming import StreamingDataset

    class _DecodingStreamingDataset(StreamingDataset):
        """StreamingDataset whose samples are read from whole mapped shard files and decoded and transformed where
        they are read (the DataLoader workers), in streaming's order for this worker."""

        def __init__(self, *, decoder: SampleDecoder, remote_split: str, **kwargs):
            super().__init__(**kwargs)
            self.decoder = decoder
            self.remote_split = remote_split
            # The epoch of random access (heldout), set by the loader before each pass; an iterated epoch is the
            # one streaming starts, which persistent workers learn from its shared state, not from their copy.
            self.transform_epoch = 0
            self._mapped = MappedShards()
            self._prefetch: ShardPrefetch | None = None

        def __iter__(self):
            """This worker's samples of the epoch, in the order streaming's own ``__iter__`` yields them.

            Replaces ``StreamingDataset.__iter__``, which yields ``self[sample_id]`` per sample behind a prepare
            and a ready thread that step through the epoch sample by sample (the profile in bench/data.py's
            docstring: with them, and a file opened per sample, the reader ran at 0.3-0.7x ImageFolder). Its first
            part is kept verbatim: which worker this is, the epoch and resumed position (``_resume_incr_epoch``),
            and this worker's partition of the epoch (``_get_work``: streaming's shuffle and ``get_partitions``,
            shared between the workers of a machine). Those are internals of streaming 0.13; no public call
            returns a worker's sample ids."""
            self.stop_prefetch()  # a previous epoch's downloads in this process
            self._unique_worker_world = self._unique_rank_world.detect_workers()
            self._parallel_worker_world = self._parallel_rank_world.detect_workers()
            epoch, sample_in_epoch = self._resume_incr_epoch()
            sample_ids = self._get_work(epoch, sample_in_epoch)
            sample_ids = sample_ids[sample_ids >= 0]  # -1 pads a worker's share; streaming yields nothing for it
            # streaming's Spanner, for all of the epoch's samples at once: shard i holds ids offset[i] ...
            offsets = self.sample_offset_per_shard
            shard_ids = np.searchsorted(offsets, sample_ids, side="right") - 1
            self._prefetch = prefetch = ShardPrefetch(self.prepare_shard_or_release, shard_ids, self.predownload)
            try:
                for position, (sample_id, shard_id) in enumerate(zip(sample_ids.tolist(), shard_ids.tolist())):
                    prefetch.advance(position)
                    yield self._sample(sample_id, shard_id, sample_id - int(offsets[shard_id]), epoch)
            finally:
                # A persistent worker may start the next epoch before this generator is collected: close only
                # this epoch's prefetch.
                prefetch.close()
                if self._prefetch is prefetch:
                    self._prefetch = None

        def stop_prefetch(self) -> None:
            """End this process's downloads ahead (the end or abandonment of an epoch)."""
            if self._prefetch is not None:
                self._prefetch.close()
                self._prefetch = None

        def close_shards(self) -> None:
            """Unmap this process's shard files (the loader is closed; its cache may go)."""
            self._mapped.close()

        def get_item(self, sample_id: int, retry: int = 7):
            """Random access (the heldout path, ``self[i]``): the same reading as an epoch's."""
            shard_id, index_in_shard = self.spanner[sample_id]
            return self._sample(sample_id, shard_id, index_in_shard, self.transform_epoch)

        def _sample(self, sample_id: int, shard_id: int, index_in_shard: int, epoch: int) -> dict[str, Any]:
            """Sample ``sample_id`` (the ``index_in_shard``-th of shard ``shard_id``) decoded and transformed for
            ``epoch``, or why it is not."""
            shard = self.shards[shard_id]
            name, position = shard.file_pairs[0][0].basename, f"#{index_in_shard}"
            try:
                if shard_id not in self._mapped:
                    self._local_and_mapped(shard_id)
                row = shard.decode_sample(self._mapped.sample_bytes(shard_id, index_in_shard))
            except UnreadableShardError as e:  # a shard file whose header does not parse: its every sample
                return self._unreadable(sample_id, epoch, f"unreadable MDS shard: {e}", name, position)
            except DataSourceError:
                raise
            except Exception as e:  # the shard's bytes do not parse as MDS at this sample
                return self._unreadable(sample_id, epoch, f"unreadable MDS sample: {type(e).__name__}: {e}", name,
                                        position)
            # streaming's sample id numbers the split's samples in index.json's shard order: the Batch index
            return {**self.decoder(row, name, position, epoch), "index": sample_id, "epoch": epoch}

        @staticmethod
        def _unreadable(sample_id: int, epoch: int, message: str, shard: str, position: str) -> dict[str, Any]:
            return {"key": position, "index": sample_id, "epoch": epoch, "error": (message, shard, position)}

        def _local_and_mapped(self, shard_id: int) -> None:
            """Make the shard local through streaming and map its raw file, where streaming's readers read it
            (``MDSReader.get_sample_data``'s path); streaming's failures as a DataSourceError naming the shard."""
            shard = self.shards[shard_id]
            name = shard.file_pairs[0][0].basename
            path = os.path.join(shard.dirname, shard.split, name)
            try:
                self._make_local(shard_id)
                try:
                    self._mapped.open(shard_id, path, shard.samples)
                except FileNotFoundError:  # evicted or removed from the cache since: streaming fetches it again
                    self.prepare_shard_or_release(shard_id)
                    self._mapped.open(shard_id, path, shard.samples)
            except UnreadableShardError:
                raise
            except Exception as e:  # a failed download, a vanished shard, a checksum that does not match
                raise DataSourceError(f"cannot read {join(self.remote_split, name)}: {type(e).__name__}: {e}; if "
                                      "the shard differs from its index.json, rewrite the split with `tarflow data "
                                      "write`") from None

        def _make_local(self, shard_id: int) -> None:
            """Wait for the shard's download ahead, if one was submitted; otherwise download it here."""
            if self._prefetch is not None:
                self._prefetch.wait(shard_id)
            else:
                self.prepare_shard_or_release(shard_id)

        def prepare_shard_or_release(self, shard_id: int) -> None:
            """``StreamingDataset.prepare_shard``, but a shard whose download or checksum failed is remote again:
            streaming leaves it "preparing", so that every other worker or rank that needs it would wait for it
            forever, and leaves a file that failed its checksum in the cache, where the next prepare_shard would
            take it as good. Here the file goes and the state is "remote" (``_shard_states`` and
            ``_cache_filelock``: streaming internals), so the next reader downloads and checks it again and fails
            with the error itself."""
            try:
                self.prepare_shard(shard_id)
            except Exception:
                from streaming.base.dataset import _ShardState

                shard = self.shards[shard_id]
                with self._cache_filelock:  # made by prepare_shard before it could fail
                    if self._shard_states[shard_id] == _ShardState.PREPARING:
                        for raw, _ in shard.file_pairs:
                            Path(shard.dirname, shard.split, raw.basename).unlink(missing_ok=True)
                        self._shard_states[shard_id] = _ShardState.REMOTE
                raise

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


# -- the partition: what streaming deals to nodes, ranks and workers --------------------------------------------------
PARTITION_ALGO = "relaxed"


def canonical_order(num_samples: int, num_canonical_nodes: int) -> np.ndarray:
    """An epoch's global order of sample positions (before the shuffle, which maps positions to sample ids by a
    permutation fixed by seed, epoch, canonical nodes and shard sizes): streaming's partition for one node, one
    rank, one worker and batches of 1. With P nodes of R ranks, node n takes every P-th entry and its rank q
    every R-th of those, i.e. entries n + qP, n + qP + W, ... (W = PR); padding lies only beyond the first
    ``canonical nodes × ceil(N / canonical nodes)`` entries, so that prefix is the same for every P, R, worker count
    and batch size (``check_partition`` verifies it for the launch at hand)."""
    from streaming.base.partition import get_partitions

    return get_partitions(PARTITION_ALGO, num_samples, num_canonical_nodes, 1, 1, 1, 1).reshape(-1)


def first_repeat(order: np.ndarray) -> int:
    """The first position of ``order`` holding padding (-1) or a sample that an earlier position holds; its length
    if there is none."""
    by_value = np.argsort(order, kind="stable")  # equal values: earlier positions first
    values = order[by_value]
    later = by_value[1:][values[1:] == values[:-1]]
    bad = np.concatenate([later, np.flatnonzero(order < 0)])
    return int(bad.min()) if len(bad) else len(order)


def train_steps_per_epoch(num_samples: int, num_canonical_nodes: int, step: int) -> int:
    """Optimizer steps of ``step`` samples in an epoch: the largest k <= N // step whose first k·step entries of the
    canonical order hold no sample twice (streaming repeats samples at the last row of its canonical layout when
    the canonical nodes do not divide N). A function of N, the canonical nodes and the step size only: the same
    number of steps on every number of ranks and micro-batch."""
    return min(num_samples, first_repeat(canonical_order(num_samples, num_canonical_nodes))) // step


def check_partition(num_samples: int, num_canonical_nodes: int, placement: Placement, workers: int,
                    batch_size: int, batches: int, drop_first: int) -> None:
    """Verify, on streaming's own partition for this launch, what the epoch plan assumes: after ``drop_first``
    samples of the epoch, the ranks' next batches up to batch ``batches`` of the epoch together hold, batch by
    batch, exactly the canonical order's next ``batch_size × world`` entries (any order within the batch), and no
    padding. A RuntimeError otherwise: a streaming version that deals differently."""
    from streaming.base.partition import get_partitions

    p, per_rank = placement, max(1, workers)
    micro = batch_size * p.world_size
    count = batches - drop_first // micro
    if count <= 0:
        return
    ids = get_partitions(PARTITION_ALGO, num_samples, num_canonical_nodes, p.num_nodes, p.local_world_size,
                         per_rank, batch_size, drop_first, p.num_nodes)
    # (nodes, ranks, workers, batches per worker, B); a rank's batch j·K + w is worker w's batch j, because the
    # DataLoader takes its workers' batches in turn: one row per batch of all ranks together
    dealt = ids.transpose(3, 2, 0, 1, 4).reshape(-1, micro)[:count]
    expected = canonical_order(num_samples, num_canonical_nodes)[drop_first:drop_first + count * micro]
    if dealt.shape != (count, micro) or len(expected) != count * micro or not np.array_equal(
            np.sort(dealt, axis=1), np.sort(expected.reshape(count, micro), axis=1)):
        raise RuntimeError(f"internal error: streaming's partition of {num_samples} samples over {p.num_nodes} "
                           f"node(s) × {p.local_world_size} rank(s) × {per_rank} worker(s), batches of {batch_size}, "
                           f"from sample {drop_first}, is not its canonical order cut in steps; this "
                           "mosaicml-streaming version partitions differently from the one this loader was built on")


def canonical_nodes(configured: int, placement: Placement, num_samples: int | None = None) -> int:
    """``data.num_canonical_nodes`` as used: fixed for the run (0, the older configs' "streaming's default", which
    was the machine count of the launch, is 1), one that streaming can partition over this launch's machines and,
    given the split's ``num_samples`` (the shuffled split), at most one canonical node per sample (more make
    streaming repeat samples throughout the epoch)."""
    if configured < 0:
        raise ValueError(f"data.num_canonical_nodes={configured} must be >= 1 (1 fits any number of machines)")
    ncn, nodes = configured or 1, placement.num_nodes
    if ncn % nodes and nodes % ncn:
        raise ValueError(f"data.num_canonical_nodes={ncn} does not fit the {nodes} machines of this launch "
                         f"(WORLD_SIZE={placement.world_size} / LOCAL_WORLD_SIZE={placement.local_world_size}): "
                         "streaming needs one to divide the other; launch on a machine count that divides it or is "
                         "a multiple of it (it must stay the same for the whole run)")
    if num_samples is not None and ncn > num_samples:
        raise ValueError(f"data.num_canonical_nodes={ncn} is more than the {num_samples} samples to shuffle; lower "
                         "it (1 fits any data set)")
    return ncn


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

