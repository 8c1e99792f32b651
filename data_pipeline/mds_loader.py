"""``data.format=mds``: MDS shards read with mosaicml-streaming, data-parallel, elastic and exactly resumable.

The reader is streaming's own machinery: ``streaming.StreamingDataset`` (its shuffle, partition over nodes, ranks
and workers, ``num_canonical_nodes``, local shard cache, S3 download) and its ``state_dict``/``load_state_dict``.
Our codec decodes images and our transforms run inside the DataLoader workers (``cfg.num_workers``), which read
each worker's samples in streaming's order from whole shard files mapped once, downloading ahead per shard through
streaming's ``prepare_shard`` (``mds_streaming``: streaming's per-sample ``__iter__`` and prepare/ready threads ran
at a third to three quarters of an ImageFolder's images/s), and which persist across training epochs (each epoch's
position reaches them through streaming's shared state, as streaming intends). Batches are
``batch.Batch``; their ``indices`` are streaming's sample ids, which number the split's samples in the shard order
of ``index.json`` (the manifest's): a sample's index is the same on every launch and in every epoch.

Layout read (written by ``data_pipeline.writer``): ``URI/<split>/index.json`` (streaming's), ``shard.NNNNN.mds``
and ``manifest.json`` (ours: image shape, encoding, classes). Before streaming sees anything, the manifest, the
index and the shard listing are checked against each other (``mds_layout``), so a missing file or unreachable
endpoint fails at construction with ``DataSourceError`` (or a ``ValueError`` naming the file), not as a hang or a
short epoch.

**Train** (shuffled, endless), read from streaming's source (0.13). Streaming lays an epoch out as one global
order of positions (``mds_streaming.canonical_order``: the samples split into ``num_canonical_nodes`` contiguous
rows, read column by column) and maps positions to sample ids by its shuffle, a permutation fixed by the shuffle
seed, the epoch, ``num_canonical_nodes``, the shuffle block size and the shard sizes — not by the launch. With P
nodes of R ranks (W = PR), node ``n`` takes every P-th entry and its rank ``q`` every R-th of those, so rank
``n + qP`` (in that numbering) reads entries ``n + qP, n + qP + W, ...``, cut into batches of ``batch_size`` and
dealt to its workers in turn (the DataLoader takes them back in turn, so a rank's batches do not depend on
``num_workers``). Batch j of all ranks together is therefore entries ``j·B·W ... (j+1)·B·W`` of the order, and
optimizer step k (A micro-batches per rank, global batch G = B·W·A) is entries ``k·G ... (k+1)·G``: **the samples
of step k are the same set whatever W, B, A (with B·W·A = G), the ranks per machine and ``num_workers``** (their
order within the step and which rank holds which sample do change). Streaming pads only past the first
``num_canonical_nodes × ceil(N / num_canonical_nodes)`` entries (repeats so that every rank gets as many, -1 for
workers), and repeats a few samples in that prefix's last column when ``num_canonical_nodes`` does not divide N.
Every rank yields ``batches_per_epoch`` full batches: whole steps of G, as many as the order holds before its first
repeated sample (at most ``N // G``; ``train_steps_per_epoch``, a function of N, ``num_canonical_nodes`` and G
only, so every launch of the same G has the same steps per epoch and the epochs start at the same step). Within
an epoch every sample is read at most once; the samples left out are the end of the epoch's shuffled order
(different ones each epoch). The constructor checks these claims on streaming's own partition function for its
launch (``check_partition``; a RuntimeError if a streaming version deals differently). The rest of streaming's
epoch is read and discarded, so that its workers always finish an epoch normally (never killed in the middle of a
shard download).

Limits. ``num_canonical_nodes`` must stay the same for the whole run (it is part of the state's identity; the
default, 1, is fixed — streaming's own default, the machine count of the first launch, is not used) and streaming
partitions only over a machine count P (``WORLD_SIZE / LOCAL_WORLD_SIZE``; without ``LOCAL_WORLD_SIZE`` every rank
is a machine) that divides it or is a multiple of it: other launches are refused at construction. With 1 canonical
node any launch fits, but on P machines every machine reads from every shard; a value that is a multiple of every
machine count the run will use lets each machine download only its 1/P of the shards. Steps are the same sets,
not the same batches: a rank's micro-batch holds other samples on another launch, so per-sample randomness must be
keyed by the sample's index (``Batch.indices``), never by the rank or position. Bitwise equality of a training
run across launches further needs the trainer's reductions to be order-independent, which this loader cannot give.

**Heldout** (natural order, one epoch per ``for`` loop). Streaming's padding would make ranks read some samples
twice, so heldout does not iterate streaming's partition: rank ``r`` reads the samples ``r, r + W, r + 2W, ...`` of
the split by random access (``StreamingDataset[i]``, which downloads/caches the shard). The ranks together read
every sample exactly once; a rank's last batch may be smaller (as the in-memory loader without ``drop_last``).
After b batches of B on W ranks the first b·B·W samples are read, so a heldout state resumes on another launch too.

**Resumption**, also onto another launch (``elastic``). ``StreamingDataset.state_dict(num_samples,
from_beginning)`` records ``{epoch, sample_in_epoch, num_canonical_nodes, shuffle_seed, initial_physical_nodes}``;
``load_state_dict`` puts it in shared memory where the next ``__iter__`` (in every worker) picks it up and drops
the first ``sample_in_epoch`` entries of the epoch's order before dealing the rest as above (``initial_physical_
nodes`` only matters to streaming when P and ``num_canonical_nodes`` do not divide one another, which is refused).
Our state holds ``batches_in_epoch`` with the ``batch_size`` and ``world_size`` that produced it; a loader resumed
with B' on W' ranks continues after the ``batches × B × W`` samples consumed (``ResumableLoader``; refused unless
B'·W' divides them — a state saved at a step boundary always qualifies for the same G), so the resumed run's step
k holds the samples the uninterrupted run's step k held. Data, seed, ``num_canonical_nodes`` and the shuffle block
size must match (the identity); ranks, ranks per machine, micro-batch and ``num_workers`` may change (tested: W=2
with 1 worker resumed on W=1 and W=4 without workers; the same world with 2 workers resumed with 0). The global
batch G is not part of the identity: a run resumed with another G continues from the same sample, cut in its new
steps. We count batches ourselves (not ``StreamingDataLoader``'s sample count, which would be off when corrupt
samples are skipped or the epoch is cut) and check streaming's part of the state and its partition from the resumed
sample on ``load_state_dict``. Streaming takes the epoch from a shared counter that is -1 before the first iteration
and already points at the next epoch at a boundary, so the saved ``epoch`` is ours and we set streaming's counter to
it before each epoch.

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

The parts: this module is the loader (its epoch plan and identity on top of ``resumable.ResumableLoader``, which
owns position, roll-over and the state checks); ``mds_streaming`` holds the ``StreamingDataset`` subclass, the
worker-side decoding, streaming's partition as the plan reads it, and streaming's view of ranks, cache and shared
memory; ``mds_layout`` reads and checks the split's files (local or S3). Imports nothing from models/, trainer/ or
cluster/.
"""

from __future__ import annotations

import logging
import shutil
import weakref
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .batch import Batch
from .codecs import CorruptSampleError
from .config import DataConfig
from .mds_layout import INDEX_NAME, check_s3_endpoints, digest, read_split
from .mds_streaming import (
    PARTITION_ALGO,
    Collate,
    Positions,
    SampleDecoder,
    canonical_nodes,
    check_partition,
    clean_stale_shared_memory,
    placement_from_env,
    shared_temp_dir,
    streaming_dataset_class,
    train_steps_per_epoch,
    worker_init,
)
from .resumable import ResumableLoader, check_split
from .seeding import derive_seed
from .storage import DataSourceError, join
from .transforms import ImageTransform

logger = logging.getLogger(__name__)

SHUFFLE_ALGO = "py1e"


def _derive_shuffle_seed(seed: int) -> int:
    """streaming shuffles with ``default_rng(shuffle_seed + epoch)``: hash our seed so that seed s, epoch e+1 is not
    seed s+1, epoch e. Non-negative, as streaming requires."""
    return derive_seed("mds-shuffle", seed) & 0x7FFFFFFF


class MDSLoader(ResumableLoader):
    """Yields ``Batch(images float32 (B,C,H,W) in [-1,1], labels int64 (B,), indices int64 (B,))`` for one rank
    from ``cfg.uri/<split>/``; ``indices`` are streaming's sample ids (the split's order in ``index.json``).

    ``train``: shuffled (streaming's shuffle, seeded from ``seed``), epochs forever, flips per ``cfg.random_flip``;
    every rank yields ``batches_per_epoch`` full batches per epoch, a whole number of optimizer steps of
    ``global_batch`` samples (micro-batch × ranks × accumulation; None: one micro-batch per rank), and step k holds
    the same samples whatever the ranks, micro-batch and workers. ``heldout``: natural order, every sample exactly
    once across ranks, one epoch per ``for`` loop (an interrupted loop continues where it stopped, a loop over a
    finished epoch starts the next one). ``state_dict()`` after consuming a batch resumes after that batch, also
    on another number of ranks or micro-batch (``elastic``).

    Undecodable samples raise ``CorruptSampleError`` (naming shard and key); with ``cfg.skip_corrupt`` they are
    left out of their batch (which is then smaller: positions never shift, so resumption stays exact) and counted in
    ``skipped_corrupt``. Call ``close()`` (or use ``with``) to stop reading ahead and remove a temporary cache.
    """

    elastic = True  # train: streaming's elastic partition; heldout: positions r, r + W, ... (module docstring)
    _worker_stream = "mds-workers"
    _refused_hint = ("; streaming resumes exactly only with the same data, seed, data.num_canonical_nodes and "
                     "shuffle block size (the ranks and micro-batch may change)")

    def __init__(self, cfg: DataConfig, split: str, batch_size: int, *, seed: int, rank: int = 0,
                 world_size: int = 1, global_batch: int | None = None) -> None:
        train = check_split(split)
        super().__init__(batch_size, seed=seed, rank=rank, world_size=world_size, repeat=train,
                         num_workers=cfg.num_workers, global_batch=global_batch)
        self.index_ordered = not train  # heldout: positions r, r + W, ... in order, for any number of workers
        if not cfg.uri:
            raise ValueError("data.uri is empty; data.format=mds reads the shards under data.uri")
        self.cfg, self.split, self._train = cfg, split, train
        self._closed = False
        self._placement = placement = placement_from_env(rank, world_size)
        check_s3_endpoints(cfg.uri)

        info = read_split(cfg.uri, split, verify=cfg.verify)
        self._manifest = manifest = info.manifest
        self._remote = join(cfg.uri, split)
        self._dataset_digest = digest(info.index_text)  # the shards' names, counts and sha1s: resume identity
        cache_digest = digest(self._remote, info.index_text)
        stored = tuple(manifest.image_shape)
        transform = ImageTransform(cfg.resize, cfg.crop, self._train and cfg.random_flip)
        resized = ImageTransform(cfg.resize).output_shape(stored)
        if cfg.crop and cfg.crop > min(resized[1:]):
            raise ValueError(f"data.crop={cfg.crop} is larger than the images ({resized[1]}×{resized[2]} after "
                             f"data.resize={cfg.resize}) of {self._remote}")
        self._collate = Collate(transform.output_shape(stored))  # what a batch holds per sample

        self._ncn = ncn = canonical_nodes(cfg.num_canonical_nodes, placement, manifest.num_samples if train else None)
        self._shuffle_seed = _derive_shuffle_seed(self.seed)
        self._shuffle_block_size = max(4_000_000 // ncn, 1 << 18)  # streaming's default, made explicit

        # Local cache: <root>/<split>-<digest>[/rank<r>], shared by the ranks of a machine.
        self._finalizer = None
        self._generators: weakref.WeakSet = weakref.WeakSet()  # live iterations, ended by close()
        self._train_dataloader = None  # train: made by the first epoch, kept (with its workers) for the next ones
        if cfg.cache_dir:
            root = cfg.cache_dir
        else:
            root = shared_temp_dir(placement)
            if placement.local_world_size == 1:  # ours alone: goes with the loader
                self._finalizer = weakref.finalize(self, shutil.rmtree, root, True)
        local = Path(root, f"{split}-{cache_digest}")
        if placement.local_world_size == 1 and world_size > 1:
            local = local / f"rank{rank}"  # each rank counts as its own node: never share a cache by accident
        self.cache_dir = str(local)

        clean_stale_shared_memory()
        sha1 = "sha1" if info.all_have_sha1 else None  # streaming checks each shard as it lands in the cache
        try:
            self._streaming = streaming_dataset_class()(
                decoder=SampleDecoder(manifest.encoding, stored, manifest.num_classes, transform, self.seed),
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
        except FileExistsError as e:
            # streaming takes the lowest free shared-memory prefix of the machine by a scan, then creates it: two
            # processes building a dataset at the same moment pick the same one.
            raise DataSourceError(f"streaming's shared memory {e.filename} was taken by another process starting an "
                                  f"MDS loader on this machine at the same moment; start this run again") from None
        except OSError as e:
            raise DataSourceError(f"cannot fetch {join(self._remote, INDEX_NAME)} into {self.cache_dir}: {e}") from None
        if self._streaming.num_samples != manifest.num_samples:
            raise ValueError(f"streaming sees {self._streaming.num_samples} samples under {self._remote}, the "
                             f"manifest says {manifest.num_samples}")

        if self._train and placement.local_world_size == 1:
            self._check_state_format()
        n = manifest.num_samples
        if train:
            bpe = self._train_batches_per_epoch()
            self._setup_epochs(num_samples=n, batches_per_epoch=bpe, samples_per_epoch=bpe * batch_size)
        else:
            self._positions = np.arange(rank, n, world_size, dtype=np.int64)
            self._setup_epochs(num_samples=n, batches_per_epoch=-(-len(self._positions) // batch_size),
                               samples_per_epoch=len(self._positions))

    # -- epoch plan ----------------------------------------------------------------------------------------------
    def _train_batches_per_epoch(self) -> int:
        """Batches per epoch on every rank: whole optimizer steps of ``global_batch`` samples, as many as streaming's
        order holds without a repeated sample (``train_steps_per_epoch``: the same count for any ranks and
        micro-batch), checked against the partition streaming deals to this launch's ranks and workers."""
        steps = train_steps_per_epoch(self._streaming.epoch_size, self._ncn, self.global_batch)
        batches = steps * (self.global_batch // (self.batch_size * self.world_size))
        self._check_partition(batches, drop_first=0)
        return batches

    def _check_partition(self, batches: int, drop_first: int) -> None:
        check_partition(self._streaming.epoch_size, self._ncn, self._placement, self.cfg.num_workers,
                        self.batch_size, batches, drop_first)

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
    def __iter__(self) -> Iterator[Batch]:
        if self._closed:
            raise RuntimeError("this MDSLoader is closed")
        gen = super().__iter__()
        self._generators.add(gen)
        return gen

    def _epoch_batches(self) -> Iterator[Batch | None]:
        return self._train_epoch() if self._train else self._heldout_epoch()

    def _loader_over(self, dataset, persistent_workers: bool = False):
        return self._dataloader(dataset, num_workers=self.cfg.num_workers, batch_size=self.batch_size,
                                collate_fn=self._collate, worker_init_fn=worker_init,
                                persistent_workers=persistent_workers)

    def _accept(self, batch) -> Batch | None:
        images, labels, indices, errors, epochs = batch
        if epochs - {self._epoch}:  # streaming's epoch (from its shared state) and ours must never drift apart
            raise RuntimeError(f"internal error: streaming read epoch(s) {sorted(epochs)}, the loader is in epoch "
                               f"{self._epoch}")
        if errors:
            if not self.cfg.skip_corrupt:
                message, shard, key = errors[0]
                raise CorruptSampleError(f"{message} in {self._remote}", shard, key)
            for message, shard, key in errors:
                logger.warning("skipping corrupt sample %s of %s/%s: %s", key, self._remote, shard, message)
            self._skipped += len(errors)
        if len(indices) == 0:
            return None
        return Batch(images, labels, indices)

    def _train_epoch(self) -> Iterator[Batch | None]:
        epoch, ds = self._epoch, self._streaming
        ds.next_epoch = epoch  # streaming's shared epoch counter: otherwise a re-started epoch reads as stale
        ds.load_state_dict(self._streaming_state(epoch, self._batch))
        if self._train_dataloader is None:
            # One DataLoader for the run: its workers stay for every epoch (streaming's design: each __iter__ in a
            # worker takes the epoch and position from the shared state just loaded), instead of being started
            # again per epoch.
            self._train_dataloader = self._loader_over(ds, persistent_workers=True)
        iterator = iter(self._train_dataloader)
        valid = 0
        try:
            for _ in range(self._batch, self.batches_per_epoch):
                try:
                    batch = next(iterator)
                except StopIteration:
                    raise DataSourceError(f"streaming ended epoch {epoch} of {self._remote} after {self._batch} of "
                                          f"{self.batches_per_epoch} batches on rank {self.rank}") from None
                out = self._accept(batch)
                valid += out is not None
                yield out
            if valid == 0 and self._batch and self._skipped:
                raise ValueError(f"every sample of epoch {epoch} of {self._remote} was corrupt; check the manifest "
                                 f"(image_shape {self._manifest.image_shape}, encoding {self._manifest.encoding})")
            for _ in iterator:  # the rest of streaming's epoch (repeats, the dropped tail): read, discarded
                pass
        except Exception:
            self._shut_down_train_workers()  # after a failed epoch the next one starts with fresh workers
            raise
        finally:
            del iterator
            self._streaming.stop_prefetch()  # with num_workers=0 its download-ahead thread runs in this process

    def _heldout_epoch(self) -> Iterator[Batch | None]:
        self._streaming.transform_epoch = self._epoch
        positions = self._positions[self._batch * self.batch_size:]
        if len(positions) == 0:
            return
        iterator = iter(self._loader_over(Positions(self._streaming, positions)))
        valid = 0
        try:
            for batch in iterator:
                out = self._accept(batch)
                valid += out is not None
                yield out
            if valid == 0 and self._skipped:
                raise ValueError(f"every sample of {self._remote} read by rank {self.rank} was corrupt; check the "
                                 f"manifest (image_shape {self._manifest.image_shape}, encoding "
                                 f"{self._manifest.encoding})")
        finally:
            del iterator

    def _shut_down_train_workers(self) -> None:
        dataloader, self._train_dataloader = self._train_dataloader, None
        # torch keeps persistent workers in the DataLoader's iterator (private); stop them now, not when collected
        iterator = getattr(dataloader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for gen in list(self._generators):  # stop the workers before their cache goes
            try:
                gen.close()
            except ValueError:  # close() called from inside the loop over this loader: it ends with the loop
                pass
        self._shut_down_train_workers()
        self._streaming.stop_prefetch()
        self._streaming.close_shards()  # this process's mappings of the cache's files, before the cache goes
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> "MDSLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- resumption ----------------------------------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        # No world, ranks per machine or batch size: the order of the epoch does not depend on them (elastic).
        return {"format": "mds", "split": self.split, "dataset": self._dataset_digest,
                "num_canonical_nodes": self._ncn, "shuffle_block_size": self._shuffle_block_size}

    def _extra_state(self) -> dict[str, Any]:
        return {"streaming": self._streaming_state(self._epoch, self._batch)} if self._train else {}

    def _load_extra_state(self, state: dict[str, Any], epoch: int, batch: int) -> None:
        if self._train:
            saved = state.get("streaming")
            want = {"epoch": epoch, "sample_in_epoch": batch * self.batch_size * self.world_size,
                    "num_canonical_nodes": self._ncn, "shuffle_seed": self._shuffle_seed}
            if not isinstance(saved, dict) or any(saved.get(k) != v for k, v in want.items()):
                raise ValueError(f"loader state's streaming part {saved} does not match {want}")
            self._check_partition(self.batches_per_epoch, drop_first=want["sample_in_epoch"])
