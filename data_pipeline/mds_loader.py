"""``data.format=mds``: MDS shards read with mosaicml-streaming, data-parallel and exactly resumable.

The reader is streaming's own machinery: ``streaming.StreamingDataset`` (its shuffle, partition over nodes, ranks
and workers, ``num_canonical_nodes``, local shard cache, S3 download) and its ``state_dict``/``load_state_dict``.
Our codec decodes images and our transforms run inside the DataLoader workers (``cfg.num_workers``).

Layout read (written by ``data_pipeline.writer``): ``URI/<split>/index.json`` (streaming's), ``shard.NNNNN.mds``
and ``manifest.json`` (ours: image shape, encoding, classes). Before streaming sees anything, the manifest, the
index and the shard listing are checked against each other, so a missing file or unreachable endpoint fails at
construction with ``DataSourceError`` (or a ``ValueError`` naming the file), not as a hang or a short epoch.

**Train** (shuffled, endless). Streaming orders an epoch as one global sequence (fixed by the shuffle seed, the
epoch, ``num_canonical_nodes`` and the shard sizes); node ``n`` takes every P-th entry, rank ``r`` of the node every
R-th entry of that, and cuts it into batches of ``batch_size``. It pads the sequence with *repeated* samples so that
every rank gets ``ceil(N / world)`` (and repeats a few more when ``num_canonical_nodes`` does not divide N). We do
as the in-memory loader does with ``drop_last``: every rank yields ``batches_per_epoch`` full batches, the largest
count ≤ ``N // (world * batch_size)`` whose global steps hold no repeated sample (computed once from streaming's
own partition function; the shuffle is a permutation, so where repeats sit does not depend on the epoch). Within
an epoch every sample is therefore read at most once across ranks, and the samples left out are the end of the
epoch's shuffled order (different samples each epoch). The rest of streaming's epoch is read and discarded, so
that its workers always finish an epoch normally (they are never killed in the middle of a shard download).

**Heldout** (natural order, one epoch per ``for`` loop). Streaming's padding would make ranks read some samples
twice, so heldout does not iterate streaming's partition: rank ``r`` reads the samples ``r, r + W, r + 2W, ...`` of
the split by random access (``StreamingDataset[i]``, which downloads/caches the shard). The ranks together read
every sample exactly once; a rank's last batch may be smaller (as the in-memory loader without ``drop_last``).

**Resumption** (read from streaming's source, 0.13): ``StreamingDataset.state_dict(num_samples, from_beginning)``
records ``{epoch, sample_in_epoch, num_canonical_nodes, shuffle_seed, initial_physical_nodes}``;
``load_state_dict`` puts it in shared memory where the next ``__iter__`` (in every worker) picks it up and drops
the first ``sample_in_epoch`` entries of the epoch's global sequence before partitioning the rest. That is exact
when ``sample_in_epoch`` counts whole global steps (``batches × batch_size × world_size``: every rank consumed the
same number of batches, as lockstep data-parallel training does) and the resumed run has the same world (nodes ×
ranks per node), ``batch_size``, seed, ``num_canonical_nodes`` and shard layout — then each rank's remaining
sequence is exactly its old sequence minus the consumed batches. ``num_workers`` does *not* matter: a rank's
sequence is dealt to its workers batch by batch and the DataLoader collects them round-robin, so a rank yields the
same batches for any number of workers (tested: save with 2 workers, resume with 0). We count batches ourselves
(not ``StreamingDataLoader``'s sample count, which would be off when corrupt samples are skipped or the epoch is
cut) and check the identity above on ``load_state_dict``. Streaming takes the epoch from a shared counter that is
-1 before the first iteration and already points at the next epoch at a boundary, so the saved ``epoch`` is ours
and we set streaming's counter to it before each epoch.

**Ranks, environment and cache.** streaming learns its place from ``RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``
(``LOCAL_RANK``) and coordinates the ranks of one machine through shared memory named after the local cache
directory. The constructor sets ``RANK``/``WORLD_SIZE`` from the arguments when they are unset and refuses
values that disagree. Several ranks on one machine must run with ``LOCAL_WORLD_SIZE``/``LOCAL_RANK`` set (torchrun
does; for tasks started by srun or as pods the trainer's process group exports them; without them two ranks of one
machine collide in streaming's shared memory), consecutive ranks per machine, the same ``num_workers``, and one
shared cache directory — ``cfg.cache_dir``, or, when that is empty, a temporary directory that local rank 0 creates
and sends to the others (which is why ``world_size > 1`` needs ``torch.distributed`` initialised; streaming also
synchronises ranks with it while the dataset is built, so loaders must be built by all ranks in the same order).
Without ``LOCAL_WORLD_SIZE`` each rank counts as its own node with its own cache subdirectory. The local ranks of a
machine share streaming's resume slot and epoch counter, so they must iterate in lockstep (same epoch and batch at
every epoch start and resume), as data-parallel training does. The cache holds ``<split>-<digest of URI and index>``
so that a dataset rewritten in place is never served from stale shards; an empty ``cfg.cache_dir`` gives a temporary
directory, removed when the loader is closed or collected (one rank per machine) or when local rank 0's process ends
(several).

Stale streaming shared memory (left by killed runs, streaming#717) is removed once per process before the first
dataset is built — only segments that no live process maps, unlike ``streaming.base.util.
clean_stale_shared_memory()``, which unlinks every streaming segment on the machine, live or not (it is used only
where /proc is unavailable).

Imports nothing from models/, trainer/ or cluster/.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from .codecs import CorruptSampleError, decode_image
from .config import DataConfig
from .manifest import MANIFEST_NAME, Manifest, read_manifest
from .seeding import derive_seed
from .storage import DataSourceError, is_s3, join, read_text, split_s3
from .transforms import ImageTransform

logger = logging.getLogger(__name__)

INDEX_NAME = "index.json"
SPLITS = ("train", "heldout")
COLUMNS = {"key": "str", "image": "bytes", "label": "int"}
SHUFFLE_ALGO = "py1e"
PARTITION_ALGO = "relaxed"


# -- helpers that run in the DataLoader workers (module level: picklable) ----------------------------------------------
@dataclass(frozen=True)
class _SampleDecoder:
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
class _Collate:
    out_shape: tuple[int, int, int]

    def __call__(self, items: list[dict[str, Any]]):
        good = [it for it in items if it["error"] is None]
        images = torch.stack([it["image"] for it in good]) if good else torch.empty((0, *self.out_shape))
        labels = torch.tensor([it["label"] for it in good], dtype=torch.int64)
        return images, labels, [it["key"] for it in good], [it["error"] for it in items if it["error"] is not None]


def _worker_init(_worker_id: int) -> None:
    # Workers are forked: a boto3 client (and its sockets) copied from the parent must not be shared between
    # processes, so streaming's downloaders start with a fresh client here.
    info = torch.utils.data.get_worker_info()
    dataset = getattr(info.dataset, "streaming", info.dataset)
    for stream in getattr(dataset, "streams", []):
        stream._downloader.clean_up()


_DATASET_CLASS = None


def _streaming_dataset_class():
    """Defined on first use, so that importing this module does not import streaming (and transformers); still
    picklable by name for spawned workers through the module ``__getattr__`` below."""
    global _DATASET_CLASS
    if _DATASET_CLASS is not None:
        return _DATASET_CLASS
    from streaming import StreamingDataset

    class _DecodingStreamingDataset(StreamingDataset):
        """StreamingDataset whose samples are decoded and transformed where they are read (the workers)."""

        def __init__(self, *, decoder: _SampleDecoder, remote_split: str, **kwargs):
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
        return _streaming_dataset_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Positions(torch.utils.data.Dataset):
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
class _Placement:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @property
    def num_nodes(self) -> int:
        return self.world_size // self.local_world_size


def _placement(rank: int, world_size: int) -> _Placement:
    """Make streaming's view of the world (environment variables) agree with our arguments, or refuse."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")

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
    return _Placement(rank, world_size, local_rank, local_world)


def _check_s3_endpoints(uri: str) -> None:
    if not is_s3(uri):
        return
    ours = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    theirs = os.environ.get("S3_ENDPOINT_URL")
    if theirs and ours and theirs.rstrip("/") != ours.rstrip("/"):
        raise ValueError(f"S3_ENDPOINT_URL={theirs} (read by mosaicml-streaming for shards) differs from "
                         f"AWS_ENDPOINT_URL={ours} (read by boto3 for manifests); point both at the same endpoint")
    if theirs and not ours:
        raise ValueError(f"S3_ENDPOINT_URL={theirs} is set but AWS_ENDPOINT_URL is not: manifests are read with "
                         "boto3's standard configuration; set AWS_ENDPOINT_URL to the same endpoint")


def _list_split(split_uri: str) -> dict[str, int]:
    """File name → size of everything directly under a split's directory or prefix."""
    if is_s3(split_uri):
        from .storage import _describe, s3_client

        bucket, key = split_s3(split_uri)
        prefix = key.rstrip("/") + "/" if key else ""
        sizes: dict[str, int] = {}
        try:
            for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    name = obj["Key"][len(prefix):]
                    if "/" not in name:
                        sizes[name] = int(obj["Size"])
        except Exception as e:
            raise _describe(e, split_uri) from None
        return sizes
    path = Path(split_uri)
    if not path.is_dir():
        raise DataSourceError(f"{split_uri} does not exist")
    return {p.name: p.stat().st_size for p in path.iterdir() if p.is_file()}


@dataclass
class _SplitInfo:
    manifest: Manifest
    index_text: str
    shard_names: list[str]
    shard_samples: list[int]
    all_have_sha1: bool


def _read_split(uri: str, split: str) -> _SplitInfo:
    """Manifest, index and shard files of a split, checked against each other before streaming reads them."""
    split_uri = join(uri, split)
    manifest_uri, index_uri = join(split_uri, MANIFEST_NAME), join(split_uri, INDEX_NAME)
    manifest = read_manifest(uri, split, "mds")
    index_text = read_text(index_uri)
    try:
        index = json.loads(index_text)
        shards = index["shards"]
        names = [s["raw_data"]["basename"] for s in shards]
        counts = [int(s["samples"]) for s in shards]
        sizes = [int(s["raw_data"]["bytes"]) for s in shards]
        formats = {s["format"] for s in shards}
        columns = [dict(zip(s["column_names"], s["column_encodings"])) for s in shards]
        all_have_sha1 = all("sha1" in (s["raw_data"].get("hashes") or {}) for s in shards)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{index_uri} is not a valid MDS index ({type(e).__name__}: {e})") from None
    if formats - {"mds"}:
        raise ValueError(f"{index_uri} lists shards of format {sorted(formats)}; this reader reads MDS")
    for name, cols in zip(names, columns):
        if any(cols.get(c) != enc for c, enc in COLUMNS.items()):
            raise ValueError(f"{index_uri}: shard {name} has columns {cols}, expected {COLUMNS}")
    listed = [(s.name, s.num_samples) for s in manifest.shards]
    if listed != list(zip(names, counts)):
        raise ValueError(f"{manifest_uri} and {index_uri} disagree on the shards (manifest: {len(listed)} shards, "
                         f"{manifest.num_samples} samples; index: {len(names)} shards, {sum(counts)} samples)")
    present = _list_split(split_uri)
    missing = [n for n in names if n not in present]
    if missing:
        more = " ..." if len(missing) > 5 else ""
        raise DataSourceError(f"{len(missing)} shard file(s) listed in {index_uri} are missing: "
                              + ", ".join(join(split_uri, n) for n in missing[:5]) + more)
    for name, size in zip(names, sizes):
        if present[name] != size:
            raise ValueError(f"{join(split_uri, name)} has {present[name]} bytes but {index_uri} says {size} "
                             "(truncated or replaced?)")
    return _SplitInfo(manifest, index_text, names, counts, all_have_sha1)


def _shared_temp_dir(placement: _Placement) -> str:
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


def _digest(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _derive_shuffle_seed(seed: int) -> int:
    """streaming shuffles with ``default_rng(shuffle_seed + epoch)``: hash our seed so that seed s, epoch e+1 is not
    seed s+1, epoch e. Non-negative, as streaming requires."""
    return derive_seed("mds-shuffle", seed) & 0x7FFFFFFF


# -- the loader --------------------------------------------------------------------------------------------------------
class MDSLoader:
    """Yields ``(images float32 (B,C,H,W) in [-1,1], labels int64 (B,))`` (plus the list of sample keys when
    ``with_keys``) for one rank from ``cfg.uri/<split>/``.

    ``train``: shuffled (streaming's shuffle, seeded from ``seed``), every rank ``batches_per_epoch`` full batches
    per epoch, epochs forever, flips per ``cfg.random_flip``. ``heldout``: natural order, every sample exactly once
    across ranks, one epoch per ``for`` loop (an interrupted loop continues where it stopped, a loop over a
    finished epoch starts the next one). ``state_dict()`` after consuming a batch resumes after that batch.

    Undecodable samples raise ``CorruptSampleError`` (naming shard and key); with ``cfg.skip_corrupt`` they are
    left out of their batch (which is then smaller: positions never shift, so resumption stays exact) and counted in
    ``skipped_corrupt``. Call ``close()`` (or use ``with``) to stop streaming's threads and remove a temporary cache.
    """

    def __init__(self, cfg: DataConfig, split: str, batch_size: int, *, seed: int, rank: int = 0,
                 world_size: int = 1, with_keys: bool = False) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if cfg.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {cfg.num_workers}")
        if not cfg.uri:
            raise ValueError("data.uri is empty; data.format=mds reads the shards under data.uri")
        self.cfg = cfg
        self.split = split
        self.batch_size = batch_size
        self.seed = int(seed)
        self.with_keys = with_keys
        self._train = split == "train"
        self._placement = placement = _placement(rank, world_size)
        self.rank, self.world_size = rank, world_size
        _check_s3_endpoints(cfg.uri)

        info = _read_split(cfg.uri, split)
        self._manifest = manifest = info.manifest
        self._remote = join(cfg.uri, split)
        self._dataset_digest = _digest(info.index_text)  # the shards' names, counts and sha1s: resume identity
        cache_digest = _digest(self._remote, info.index_text)
        stored = tuple(manifest.image_shape)
        transform = ImageTransform(cfg.resize, cfg.crop, self._train and cfg.random_flip)
        resized = ImageTransform(cfg.resize).output_shape(stored)
        if cfg.crop and cfg.crop > min(resized[1:]):
            raise ValueError(f"data.crop={cfg.crop} is larger than the images ({resized[1]}×{resized[2]} after "
                             f"data.resize={cfg.resize}) of {self._remote}")
        self.image_shape = transform.output_shape(stored)  # what a batch holds per sample

        nodes = placement.num_nodes
        ncn = cfg.num_canonical_nodes or nodes  # streaming's default for py1e: the physical nodes of the first run
        if ncn < 1 or (ncn % nodes and nodes % ncn):
            raise ValueError(f"data.num_canonical_nodes={cfg.num_canonical_nodes} and the {nodes} node(s) must "
                             "divide one another (streaming's partition requires it)")
        self._ncn = ncn
        self._shuffle_seed = _derive_shuffle_seed(self.seed)
        self._shuffle_block_size = max(4_000_000 // ncn, 1 << 18)  # streaming's default, made explicit

        # Local cache: <root>/<split>-<digest>[/rank<r>], shared by the ranks of a machine.
        self._finalizer = None
        self._generators: weakref.WeakSet = weakref.WeakSet()  # live iterations, ended by close()
        if cfg.cache_dir:
            root = cfg.cache_dir
        else:
            root = _shared_temp_dir(placement)
            if placement.local_world_size == 1:  # ours alone: goes with the loader
                self._finalizer = weakref.finalize(self, shutil.rmtree, root, True)
        local = Path(root, f"{split}-{cache_digest}")
        if placement.local_world_size == 1 and world_size > 1:
            local = local / f"rank{rank}"  # each rank counts as its own node: never share a cache by accident
        self.cache_dir = str(local)

        clean_stale_shared_memory()
        sha1 = "sha1" if info.all_have_sha1 else None  # streaming checks each shard as it lands in the cache
        try:
            self._streaming = _streaming_dataset_class()(
                decoder=_SampleDecoder(manifest.encoding, stored, manifest.num_classes, transform, self.seed),
                remote_split=self._remote,
                remote=self._remote, local=self.cache_dir, split=None, validate_hash=sha1,
                shuffle=self._train, shuffle_algo=SHUFFLE_ALGO, shuffle_seed=self._shuffle_seed,
                shuffle_block_size=self._shuffle_block_size, num_canonical_nodes=ncn,
                partition_algo=PARTITION_ALGO, batch_size=batch_size,
            )
        except ValueError as e:
            if "Reused local directory" in str(e):
                raise ValueError(f"another live MDS loader on this machine uses the cache {self.cache_dir}; close() "
                                 "it first or give this one another data.cache_dir") from None
            raise
        except OSError as e:
            raise DataSourceError(f"cannot fetch {join(self._remote, INDEX_NAME)} into {self.cache_dir}: {e}") from None
        if self._streaming.num_samples != manifest.num_samples:
            raise ValueError(f"streaming sees {self._streaming.num_samples} samples under {self._remote}, the "
                             f"manifest says {manifest.num_samples}")

        if self._train and placement.local_world_size == 1:
            self._check_state_format()
        n = manifest.num_samples
        if self._train:
            self._bpe = self._train_batches_per_epoch()
            if self._bpe == 0:
                raise ValueError(f"{n} samples give no batch of {batch_size} per rank across {world_size} ranks; "
                                 "an endless loader would never yield")
            self._samples_per_epoch = self._bpe * batch_size
        else:
            self._positions = np.arange(rank, n, world_size, dtype=np.int64)
            self._bpe = -(-len(self._positions) // batch_size)
            self._samples_per_epoch = len(self._positions)
        self._collate = _Collate(self.image_shape)
        self._epoch = 0
        self._batch = 0  # batches of the current epoch already handed out
        self._skipped = 0
        self._closed = False

    # -- public properties ---------------------------------------------------------------------------------------
    @property
    def batches_per_epoch(self) -> int:
        """Batches this rank yields per epoch (train: full batches only)."""
        return self._bpe

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from (before a pending roll-over at the end of an epoch)."""
        return self._epoch

    @property
    def num_samples(self) -> int:
        """Samples in the split (all ranks)."""
        return self._manifest.num_samples

    @property
    def samples_per_epoch(self) -> int:
        """Sample positions this rank reads per epoch (skipped corrupt samples included)."""
        return self._samples_per_epoch

    @property
    def num_classes(self) -> int:
        return self._manifest.num_classes

    @property
    def skipped_corrupt(self) -> int:
        """Corrupt samples left out so far (with ``cfg.skip_corrupt``), carried over by ``state_dict``."""
        return self._skipped

    # -- epoch plan ----------------------------------------------------------------------------------------------
    def _train_batches_per_epoch(self) -> int:
        """The largest k <= N // (world * B) such that the first k global steps of streaming's partition hold no
        repeated sample (streaming pads with repeats; its shuffle only permutes ids, so this holds every epoch)."""
        from streaming.base.partition import get_partitions

        p, b = self._placement, self.batch_size
        cap = self._streaming.epoch_size // (p.world_size * b)
        if cap == 0:
            return 0
        ids = get_partitions(PARTITION_ALGO, self._streaming.epoch_size, self._ncn, p.num_nodes,
                             p.local_world_size, 1, b)  # (nodes, ranks per node, 1 worker, batches, B)
        steps = ids[:, :, 0, :cap, :].transpose(2, 0, 1, 3).reshape(cap, -1)  # one row per global step
        seen = np.zeros(self._streaming.epoch_size, dtype=bool)
        for k, row in enumerate(steps):
            if (row < 0).any() or seen[row].any() or len(np.unique(row)) != len(row):
                return k
            seen[row] = True
        return cap

    def _streaming_state(self, epoch: int, batch: int) -> dict[str, Any]:
        """streaming's resumption state for "``batch`` batches of ``epoch`` consumed on every rank": the dict
        ``StreamingDataset.state_dict(batch * B * world, from_beginning=True)`` returns, with our epoch.

        Built here rather than by calling it: that method reads the shared resume slot, which another local rank may
        be rewriting at that moment (a torn read fails with a JSONDecodeError). ``_check_state_format`` compares the
        two once, where no other rank can write."""
        return {"epoch": epoch, "sample_in_epoch": batch * self.batch_size * self.world_size,
                "num_canonical_nodes": self._ncn, "shuffle_seed": self._shuffle_seed,
                "initial_physical_nodes": self._placement.num_nodes}

    def _check_state_format(self) -> None:
        theirs = self._streaming.state_dict(3 * self.batch_size * self.world_size, True)
        ours = self._streaming_state(0, 3)
        theirs = {**theirs, "epoch": 0}  # streaming's counter says -1 before the first epoch
        if set(theirs) != set(ours) or any(int(theirs[k]) != ours[k] for k in ours):
            raise RuntimeError(f"internal error: streaming's state {theirs} differs from ours {ours}; this "
                               "mosaicml-streaming version resumes differently from the one this loader was built on")

    # -- iteration -----------------------------------------------------------------------------------------------
    def _dataloader(self, dataset) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.cfg.num_workers,
            collate_fn=self._collate, worker_init_fn=_worker_init if self.cfg.num_workers else None,
            persistent_workers=False, drop_last=False,
            # Its own generator: the default draws the workers' base seed from the global RNG, which the trainer's
            # noise comes from, and a resumed run starts its loaders at other points than the original.
            generator=torch.Generator().manual_seed(derive_seed("mds-workers", self.seed, self._epoch)),
        )

    def _accept(self, batch) -> tuple | None:
        images, labels, keys, errors = batch
        if errors:
            if not self.cfg.skip_corrupt:
                message, shard, key = errors[0]
                raise CorruptSampleError(f"{message} in {self._remote}", shard, key)
            for message, shard, key in errors:
                logger.warning("skipping corrupt sample %s of %s/%s: %s", key, self._remote, shard, message)
            self._skipped += len(errors)
        if not keys:
            return None
        return (images, labels, keys) if self.with_keys else (images, labels)

    def __iter__(self) -> Iterator[tuple]:
        if self._closed:
            raise RuntimeError("this MDSLoader is closed")
        gen = self._iter_train() if self._train else self._iter_heldout()
        self._generators.add(gen)
        return gen

    def _iter_train(self):
        while True:
            if self._batch >= self._bpe:
                self._epoch, self._batch = self._epoch + 1, 0
            yield from self._train_epoch()

    def _train_epoch(self):
        epoch = self._epoch
        ds = self._streaming
        ds.next_epoch = epoch  # streaming's shared epoch counter: otherwise a re-started epoch reads as stale
        ds.load_state_dict(self._streaming_state(epoch, self._batch))
        ds.transform_epoch = epoch  # copied into the workers created by iter() below
        iterator = iter(self._dataloader(ds))
        valid = 0
        try:
            while self._batch < self._bpe:
                try:
                    batch = next(iterator)
                except StopIteration:
                    raise DataSourceError(f"streaming ended epoch {epoch} of {self._remote} after {self._batch} of "
                                          f"{self._bpe} batches on rank {self.rank}") from None
                self._batch += 1  # counted before the yield: a state saved after using this batch resumes after it
                out = self._accept(batch)
                if out is not None:
                    valid += 1
                    yield out
            if valid == 0 and self._batch and self._skipped:
                raise ValueError(f"every sample of epoch {epoch} of {self._remote} was corrupt; check the manifest "
                                 f"(image_shape {self._manifest.image_shape}, encoding {self._manifest.encoding})")
            for _ in iterator:  # the rest of streaming's epoch (repeats, the dropped tail): read, discarded
                pass
        finally:
            del iterator
            self._stop_streaming_threads()

    def _iter_heldout(self):
        if self._batch >= self._bpe:  # a finished epoch: a new loop starts the next one
            self._epoch, self._batch = self._epoch + 1, 0
        self._streaming.transform_epoch = self._epoch
        positions = self._positions[self._batch * self.batch_size:]
        if len(positions) == 0:
            return
        iterator = iter(self._dataloader(_Positions(self._streaming, positions)))
        valid = 0
        try:
            for batch in iterator:
                self._batch += 1
                out = self._accept(batch)
                if out is not None:
                    valid += 1
                    yield out
            if valid == 0 and self._skipped:
                raise ValueError(f"every sample of {self._remote} read by rank {self.rank} was corrupt; check the "
                                 f"manifest (image_shape {self._manifest.image_shape}, encoding "
                                 f"{self._manifest.encoding})")
        finally:
            del iterator

    def _stop_streaming_threads(self) -> None:
        """With num_workers=0 streaming's download threads run in this process: stop them at the end of an epoch."""
        it = getattr(self._streaming, "_iterator", None)
        if it is not None:
            it.exit()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for gen in list(self._generators):  # stop the workers before their cache goes
            try:
                gen.close()
            except ValueError:  # close() called from inside the loop over this loader: it ends with the loop
                pass
        self._stop_streaming_threads()
        executor = getattr(self._streaming, "_executor", None)
        if executor is not None:
            executor.shutdown(wait=False)
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> "MDSLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- resumption ----------------------------------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        """What must match for a saved position to mean the same samples."""
        return {
            "format": "mds",
            "split": self.split,
            "dataset": self._dataset_digest,
            "seed": self.seed,
            "world_size": self.world_size,
            "local_world_size": self._placement.local_world_size,
            "batch_size": self.batch_size,
            "num_samples": self.num_samples,
            "num_canonical_nodes": self._ncn,
            "shuffle_block_size": self._shuffle_block_size,
        }

    def state_dict(self) -> dict[str, Any]:
        """Plain ints, strings and a dict of them (``torch.save``-able, loads with ``weights_only=True``)."""
        state = {"epoch": self._epoch, "batches_in_epoch": self._batch, "skipped_corrupt": self._skipped,
                 **self._identity()}
        if self._train:
            state["streaming"] = self._streaming_state(self._epoch, self._batch)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = self._identity()
        missing = [k for k in ("epoch", "batches_in_epoch", *expected) if k not in state]
        if missing:
            raise ValueError(f"loader state lacks {missing}")
        differ = [f"{k}: saved {state[k]!r}, now {v!r}" for k, v in expected.items() if state[k] != v]
        if differ:
            raise ValueError("loader state is from a different setup (" + "; ".join(differ) + "); streaming "
                             "resumes exactly only with the same data, seed, world, batch size and "
                             "num_canonical_nodes")
        epoch, batch = int(state["epoch"]), int(state["batches_in_epoch"])
        if epoch < 0 or not 0 <= batch <= self._bpe:
            raise ValueError(f"loader state epoch={epoch} batches_in_epoch={batch} out of range "
                             f"(batches_per_epoch={self._bpe})")
        if self._train:
            saved = state.get("streaming")
            want = {"epoch": epoch, "sample_in_epoch": batch * self.batch_size * self.world_size,
                    "num_canonical_nodes": self._ncn, "shuffle_seed": self._shuffle_seed}
            if not isinstance(saved, dict) or any(saved.get(k) != v for k, v in want.items()):
                raise ValueError(f"loader state's streaming part {saved} does not match {want}")
        self._epoch, self._batch = epoch, batch
        self._skipped = int(state.get("skipped_corrupt", 0))
