"""The ``data.format=webdataset`` reader: tar shards (local or ``s3://``) → batches, data-parallel, exactly resumable,
and for ``train`` elastic: a global step holds the same samples whatever the ranks, micro-batch and workers.

Reading uses webdataset's own pipeline (``wds.SimpleShardList`` → a shard opener → webdataset's tar expander and
key grouping → ``wds.shuffle``) inside the workers of a ``torch.utils.data.DataLoader`` (``data.num_workers``; 0 =
in-process). ``s3://`` shards are opened through a handler registered in webdataset's ``gopen_schemes`` that returns
the boto3 ``get_object`` body (``storage.open_stream``): no shell pipes, endpoint and credentials from the AWS chain.

Every batch is a ``Batch(images, labels, indices)``: a sample's index is its position in the split in manifest
order (the samples of shard 0, then of shard 1, …), the same on any launch.

**Plan of a training epoch** (a pure function of the manifest, seed, epoch, global batch G and the number of
streams S — never of the ranks, the micro-batch or the workers). The manifest's shards are put in an order seeded by
(seed, epoch); their samples, concatenated in that order, form the epoch's sequence of N positions. Stream s
(0 ≤ s < S) is the contiguous run [s·N/S, (s+1)·N/S) (floor) of that sequence, read through its own shuffle buffer
of ``data.shuffle_buffer`` samples seeded by (seed, epoch, s); a run may start and end inside a shard (the samples
before its start are read and dropped undecoded, reading stops at its end). Global step k takes the samples
k·c … (k+1)·c − 1 of every stream's shuffled output, c = G/S, so an epoch has K = ⌊min run length / c⌋ steps and
**what is dropped per epoch is each stream's leftover** (at most c samples a stream, a different random handful
every epoch since it is what is left in the shuffle buffer).

- S is ``data.streams``, or for 0 the largest divisor of G that is at most ⌊shards/4⌋ (≥ 1) and at most 64. It
  must divide G, be a multiple of the number of ranks W and be at most the number of shards: anything else is
  refused up front (ValueError naming data.streams, W and G and a value that fits). G is the ``global_batch`` the
  trainer passes (micro-batch B × W × gradient accumulation A); None means B × W.
- Rank r reads only its streams [r·S/W, (r+1)·S/W), so each rank reads about 1/W of the shards. Its part of step k
  is the chunks of its streams in stream order, G/W samples, cut into A = G/(W·B) micro-batches of B.
- Workers: a rank's streams are split into min(num_workers, S/W) contiguous blocks, one a worker; each worker
  yields one item per step holding a chunk of each of its streams, and the main process, once it holds the step's
  items of all workers, assembles the rank's micro-batches from them in stream order — so the batches do not
  depend on the number of workers, nor on the order in which the DataLoader hands over the items.
- Memory: every stream has its own shuffle buffer, so a rank holds S/W buffers of ``data.shuffle_buffer`` encoded
  samples (and an open shard per stream); with few ranks and many streams lower ``data.shuffle_buffer``.
- Flips (``data.random_flip``) depend only on (seed, epoch, key): see ``transforms.flip_decision``.
- Each epoch is one pass of a fresh DataLoader (fresh worker processes): epochs never mix.

**Held-out plan** (manifest order, not elastic): rank r gets positions [r·N/W, (r+1)·N/W) (floor), nothing is
dropped; K_r = ⌈n_r/B⌉ batches, worker w reads c_w = ⌈(K_r − w)/V⌉ of them (V = reader slots = max(1, workers),
at most ⌊shards/W⌋ workers) from one contiguous run, the rank's last batch may be partial. The
ranks together yield every sample exactly once. With num_workers ≤ 1 a rank yields its part in manifest order; with
more workers its batches interleave the workers' runs round-robin.

**Corrupt samples.** An image that does not decode or disagrees with the manifest's shape, a missing image member or
a bad label raises ``CorruptSampleError`` naming the shard and the key. With ``data.skip_corrupt`` the sample is
skipped and counted (``skipped_corrupt``). A training stream then takes further samples of its run to fill its
chunk; if its run is used up first it starts again from the start of its run for this epoch (same shuffle, so some
samples appear twice): every step stays full, so DDP never waits on a short rank. A run in which no sample decodes
is an error. A ``heldout`` batch just loses its corrupt samples (a batch left empty is not yielded but counted).

**Bad shards.** Before anything is read, every shard the manifest lists must be present with the manifest's size
(``data.verify``, see ``verify``; one listing per split); with ``data.verify=sha256`` each shard is also hashed as
it is read and its digest compared once the reader is done with it (the rest of a shard that a run stops inside is
read for that). A shard that is missing, unreadable, truncated, of another digest or holds a different number of
samples than the manifest lists is a ``DataSourceError`` naming the shard.

**Resumption.** The state is (epoch, micro-batches of the epoch handed out, the micro-batch and world size that
counted them, per stream the corrupt samples skipped before the current step, and the identity of the setup:
seed, S, G, shuffle buffer, data set). ``train`` is elastic: the state means "k global steps of the epoch consumed"
(micro-batches × B × W = k·G), so it resumes on any W' that divides S and any B' with B'·W' dividing G. Each stream
regenerates its shuffled raw output and drops, without decoding, the k·c samples (plus its corrupt skips) already
used, then carries on: the rest of the epoch comes out as the same global steps, then the following epochs. A state
saved inside a step resumes only on the same W and B (the step's split into micro-batches depends on them). Each
rank knows the corrupt counts of its own streams only (the trainer loads rank 0's state everywhere): with
``skip_corrupt`` a stream whose count the state lacks decodes while fast-forwarding to find its skips (slower,
still exact). ``heldout`` states require the same world size, micro-batch and workers.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterator

import torch

from .batch import Batch
from .config import DataConfig
from .manifest import MANIFEST_NAME, read_manifest
from .resumable import ResumableLoader, check_split
from .storage import join
from .transforms import ImageTransform
from .verify import check_shard_sizes
from .webdataset_plan import HeldoutPlan, StreamPlan
from .webdataset_reader import HeldoutEpoch, SampleDecoder, ShardSet, TrainEpoch, unpack_error, worker_init


class WebDatasetLoader(ResumableLoader):
    """``Batch(images float32 (B,C,H,W) in [-1,1], labels int64 (B,), indices int64 (B,))`` for one rank, read
    from webdataset tar shards (see the module docstring for the plan).

    ``train``: shuffled, endless, K·A full micro-batches per epoch on every rank, flips per ``cfg.random_flip``;
    ``global_batch`` is the samples of one optimizer step over all ranks (None: ``batch_size × world_size``).
    ``heldout``: manifest order, one epoch per ``for`` loop, every sample once across ranks, no flips; a loop that
    was interrupted continues where it stopped, a loop over a finished epoch starts the next epoch.

    ``state_dict()`` counts the micro-batches already handed out (counted before each is yielded: save after using
    it).
    """

    def __init__(self, cfg: DataConfig, split: str, batch_size: int, *, seed: int, rank: int = 0,
                 world_size: int = 1, global_batch: int | None = None) -> None:
        train = check_split(split)
        super().__init__(batch_size, seed=seed, rank=rank, world_size=world_size, repeat=train,
                         num_workers=cfg.num_workers, global_batch=global_batch)
        self.elastic = train
        self.cfg, self.split, self._train = cfg, split, train
        m = self._manifest = read_manifest(cfg.uri, split, "webdataset")
        split_uri = join(cfg.uri, split)
        check_shard_sizes(split_uri, m, cfg.verify)
        stored = tuple(int(x) for x in m.image_shape)
        if cfg.crop and cfg.crop > min(ImageTransform(cfg.resize).output_shape(stored)[1:]):
            raise ValueError(f"data.crop={cfg.crop} is larger than the images ({stored} stored, resize={cfg.resize})")
        counts = [s.num_samples for s in m.shards]
        urls = [join(split_uri, s.name) for s in m.shards]
        offsets = [sum(counts[:i]) for i in range(len(counts))]
        hashes = {u: s.sha256 for u, s in zip(urls, m.shards)} if cfg.verify == "sha256" else None
        self._shards = ShardSet(urls, counts, offsets, hashes, join(split_uri, MANIFEST_NAME))
        transform = ImageTransform(cfg.resize, cfg.crop, random_flip=train and cfg.random_flip)
        self._decoder = SampleDecoder(encoding=m.encoding, shape=stored, num_classes=m.num_classes,
                                      transform=transform, seed=self.seed)
        if train:
            if cfg.streams < 0:
                raise ValueError(f"data.streams must be >= 0 (0: the default), got {cfg.streams}")
            plan = self._stream_plan = StreamPlan(
                counts, seed=self.seed, streams=cfg.streams, global_batch=self.global_batch,
                batch_size=batch_size, world_size=world_size)
            # more workers than the rank's streams would have nothing to read
            self._workers = min(cfg.num_workers, plan.streams_per_rank)
            self._setup_epochs(num_samples=m.num_samples, batches_per_epoch=plan.steps * plan.micro_batches,
                               samples_per_epoch=plan.steps * plan.global_batch // world_size)
            self._corrupt_epoch = [0] * plan.streams  # per stream, before the current step; -1: not known
        else:
            # Held-out splits are small (often one shard): evaluation uses at most one worker per shard of a rank's
            # share, and ranks may share a shard (each reads its own sample range of it).
            self._workers = min(cfg.num_workers, len(m.shards) // world_size)
            plan = self._heldout_plan = HeldoutPlan(counts, batch_size=batch_size, world_size=world_size,
                                                    slots=max(1, self._workers))
            runs = plan.ranges[rank]
            self.index_ordered = self._workers <= 1  # more workers interleave their runs batch by batch
            self._setup_epochs(num_samples=m.num_samples, batches_per_epoch=plan.rank_batches[rank],
                               samples_per_epoch=runs[-1][1] - runs[0][0])

    @property
    def streams(self) -> int:
        """The number of training streams S (0 for ``heldout``)."""
        return self._stream_plan.streams if self._train else 0

    # -- iteration -----------------------------------------------------------------------------------------------
    def _epoch_started(self) -> None:
        if self._train:
            self._corrupt_epoch = [0] * self._stream_plan.streams

    def _epoch_batches(self) -> Iterator[Batch | None]:
        yield from self._train_batches() if self._train else self._heldout_batches()
        if self._batch < self.batches_per_epoch:
            raise RuntimeError(f"epoch {self._epoch} ended after {self._batch} of {self.batches_per_epoch} "
                               f"batches (rank {self.rank}); the shards changed while reading?")

    def _train_batches(self) -> Iterator[Batch]:
        plan = self._stream_plan
        first_step, first_micro = divmod(self._batch, plan.micro_batches)
        dataset = TrainEpoch(plan=plan, shards=self._shards, decoder=self._decoder, epoch=self._epoch,
                             rank=self.rank, slots=max(1, self._workers), shuffle_buffer=self.cfg.shuffle_buffer,
                             skip_corrupt=self.cfg.skip_corrupt, first_step=first_step,
                             corrupt=list(self._corrupt_epoch))
        loader = self._dataloader(dataset, num_workers=self._workers, batch_size=None, worker_init_fn=worker_init)
        pending: dict[int, list[dict]] = {}  # step → the items of its workers received so far
        step = first_step
        for item in loader:
            if "error" in item:
                raise unpack_error(item["error"])
            pending.setdefault(item["step"], []).append(item)
            while len(pending.get(step, ())) == max(1, self._workers):
                items = sorted(pending.pop(step), key=lambda it: it["worker"])
                yield from self._step_batches(items, first_micro if step == first_step else 0)
                step += 1

    def _step_batches(self, items: list[dict], first_micro: int) -> Iterator[Batch]:
        """The rank's micro-batches of one step from its workers' items (in worker order), from ``first_micro``."""
        plan, b = self._stream_plan, self.batch_size
        for it in items:
            for s, n in it["found"].items():
                self._corrupt_epoch[s] = n  # skips before this step, found while fast-forwarding
        # workers hold contiguous blocks of the rank's streams: in worker order, the chunks are in stream order
        assert [s for it in items for s in it["streams"]] == plan.rank_streams(self.rank)
        images = [it["images"] for it in items]
        labels, indices = (torch.tensor([v for it in items for v in it[k]], dtype=torch.int64)
                           for k in ("labels", "indices"))
        for a in range(first_micro, plan.micro_batches):
            if a == plan.micro_batches - 1:  # the step is used up: its skips now precede the next step
                for it in items:
                    for s, n in it["corrupt"].items():
                        self._corrupt_epoch[s] = max(self._corrupt_epoch[s], 0) + n
                        self._skipped += n
            part = slice(a * b, (a + 1) * b)
            yield Batch(_rows(images, a * b, (a + 1) * b), labels[part], indices[part])

    def _heldout_batches(self) -> Iterator[Batch | None]:
        dataset = HeldoutEpoch(plan=self._heldout_plan, shards=self._shards, decoder=self._decoder,
                               epoch=self._epoch, rank=self.rank, skip_corrupt=self.cfg.skip_corrupt,
                               consumed=self._batch)
        loader = self._dataloader(dataset, num_workers=self._workers, batch_size=None, worker_init_fn=worker_init)
        for item in loader:
            if "error" in item:
                raise unpack_error(item["error"])
            self._skipped += item["corrupt"]
            if not len(item["indices"]):
                yield None  # every sample of this batch was corrupt and skipped (counted, not yielded)
                continue
            yield Batch(item["images"], torch.tensor(item["labels"], dtype=torch.int64),
                        torch.tensor(item["indices"], dtype=torch.int64))

    # -- resumption ----------------------------------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        digest = hashlib.blake2b(digest_size=8)
        for s in self._manifest.shards:
            digest.update(f"{s.name}:{s.num_samples}:{s.sha256}\n".encode())
        identity: dict[str, Any] = {"format": "webdataset", "split": self.split, "dataset": digest.hexdigest()}
        if self._train:
            plan = self._stream_plan
            identity.update(streams=plan.streams, global_batch=plan.global_batch,
                            shuffle_buffer=self.cfg.shuffle_buffer)
        else:
            identity.update(num_workers=self._workers, shuffle_buffer=0)
        return identity

    def _extra_state(self) -> dict[str, Any]:
        if not self._train:
            return {}
        # only this rank's streams are known here (another rank's counts live in that rank's loader)
        mine = set(self._stream_plan.rank_streams(self.rank))
        unknown = -1 if self.cfg.skip_corrupt else 0
        return {"corrupt_in_epoch": ",".join(str(c if s in mine else unknown)
                                             for s, c in enumerate(self._corrupt_epoch))}

    def _load_extra_state(self, state: dict[str, Any], epoch: int, batch: int) -> None:
        if not self._train:
            return
        plan = self._stream_plan
        saved_b, saved_w = int(state["batch_size"]), int(state["world_size"])
        consumed = int(state["batches_in_epoch"]) * saved_b * saved_w
        if consumed % plan.global_batch and (saved_b, saved_w) != (self.batch_size, self.world_size):
            raise ValueError(f"loader state was saved inside global step {consumed // plan.global_batch} of epoch "
                             f"{epoch} ({consumed} samples, global batch {plan.global_batch}); a state from inside a "
                             f"step resumes only with the same micro-batch × ranks (saved {saved_b} × {saved_w}, "
                             f"now {self.batch_size} × {self.world_size}); save at a step boundary")
        corrupt = [int(c) for c in str(state.get("corrupt_in_epoch", "")).split(",") if c != ""]
        if len(corrupt) != plan.streams:
            corrupt = [-1 if self.cfg.skip_corrupt else 0] * plan.streams
        self._corrupt_epoch = corrupt


def _rows(parts: list[torch.Tensor], lo: int, hi: int) -> torch.Tensor:
    """Rows [lo, hi) of the concatenation of ``parts``: a view when they lie in one part (no copy)."""
    pieces, start = [], 0
    for part in parts:
        end = start + len(part)
        if lo < end and hi > start:
            pieces.append(part[max(lo - start, 0):min(hi, end) - start])
        start = end
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


__all__ = ["WebDatasetLoader"]
