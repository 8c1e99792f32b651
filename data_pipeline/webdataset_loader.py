"""The ``data.format=webdataset`` reader: tar shards (local or ``s3://``) → batches, data-parallel, exactly resumable.

Reading uses webdataset's own pipeline (``wds.DataPipeline`` of ``wds.SimpleShardList`` → ``wds.tarfile_to_samples``
→ ``wds.shuffle``) inside the workers of a ``torch.utils.data.DataLoader`` (``data.num_workers``; 0 = in-process).
``s3://`` shards are opened through a handler registered in webdataset's ``gopen_schemes`` that returns the boto3
``get_object`` body (``storage.open_stream``): no shell pipes, endpoint and credentials from the AWS chain.

**Plan of an epoch** (the same in every process: a pure function of the manifest, seed, epoch, batch size B, world
size R and reader slots W = max(1, num_workers)). The manifest's shards are put in an order — for ``train`` a
permutation seeded by (seed, epoch), for ``heldout`` manifest order — and their samples, concatenated in that order,
form the epoch's sequence of N positions. Each of the R × W readers (rank r, worker w) gets one contiguous run of
that sequence, runs laid out rank-major (r0w0, r0w1, …, r1w0, …); a run may start and end inside a shard (the
samples before its start are read and dropped undecoded, reading stops at its end).

- ``train``: every rank yields K = N // (R·B) full batches per epoch. Worker w builds c_w = ⌈(K − w)/W⌉ of them,
  which is exactly the rank's batches w, w+W, w+2W, … — the order in which the DataLoader visits its workers — so
  the rank's sequence is deterministic and batch j comes from worker j mod W. A run holds c_w·B samples plus an
  even share of the S = N − R·K·B < R·B surplus positions. The worker reads its run through a shuffle buffer of
  ``data.shuffle_buffer`` samples seeded by (seed, epoch, rank, worker), decodes, and stops after its c_w batches:
  **what is dropped per epoch is the S surplus samples**, i.e. whatever is left in each worker's shuffle buffer
  when its batches are full (a different random handful every epoch, < R·B samples in all).
- ``heldout``: rank r gets positions [r·N/R, (r+1)·N/R) (floor), nothing is dropped; K_r = ⌈n_r/B⌉ batches, worker
  w reads c_w = ⌈(K_r − w)/W⌉ of them from its run in manifest order, the rank's last batch may be partial. The
  ranks together yield every sample exactly once. With num_workers ≤ 1 a rank yields its part in manifest order;
  with more workers its batches interleave the workers' runs round-robin.
- Flips (``train`` and ``data.random_flip``) depend only on (seed, epoch, key): see ``transforms.flip_decision``.
- Fewer shards than R × W readers is refused up front (ValueError): write more, smaller shards or use fewer workers.
- Each epoch is one pass of a fresh DataLoader (fresh worker processes): epochs never mix in the round-robin.

**Corrupt samples.** An image that does not decode or disagrees with the manifest's shape, a missing image member or
a bad label raises ``CorruptSampleError`` naming the shard and the key. With ``data.skip_corrupt`` the sample is
skipped and counted (``skipped_corrupt``, summed over workers in the main process from counts carried with each
batch). A training worker then takes further samples of its run to fill its batches; if its run is used up first it
wraps around to the start of its own run for this epoch (same shuffle, so some samples appear twice): every rank
still yields exactly K full batches, so DDP never waits on a short rank. A run in which no sample decodes is an
error. A ``heldout`` batch just loses its corrupt samples (a batch left empty is not yielded but still counted).
A shard that is missing, unreadable, truncated or holds a different number of samples than the manifest lists is a
``DataSourceError`` naming the shard.

**Resumption.** The state is (epoch, batches of the epoch handed out, and for ``skip_corrupt`` the per-worker count
of corrupt samples skipped this epoch, plus the identity of the setup). A resumed loader rebuilds the epoch's plan;
worker w regenerates its shuffled raw stream and drops, without decoding, the samples it had already consumed
(d_w·B + its corrupt count, d_w = its share of the batches handed out), then carries on: the remaining batches of
the epoch come out identically, then the following epochs. A state from a different seed, world size, batch size,
number of workers, shuffle buffer or data set is refused. A state saved by another rank (the trainer loads rank 0's
state everywhere) is fine: positions are the same on all ranks unless corrupt samples were skipped, in which case
this rank's fast-forward decodes to find its corrupt samples (slower, still exact).
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterator

from .config import DataConfig
from .manifest import read_manifest
from .resumable import ResumableLoader, check_split
from .storage import join
from .transforms import ImageTransform
from .webdataset_plan import EpochPlan
from .webdataset_reader import EpochStream, SampleDecoder, unpack_error, worker_init


class WebDatasetLoader(ResumableLoader):
    """Batches ``(images float32 (B,C,H,W) in [-1,1], labels int64 (B,))`` — plus the list of sample keys with
    ``with_keys`` — for one rank, read from webdataset tar shards (see the module docstring for the plan).

    ``train``: shuffled, endless, K full batches per epoch on every rank, flips per ``cfg.random_flip``.
    ``heldout``: manifest order, one epoch per ``for`` loop, every sample once across ranks, no flips; a loop that
    was interrupted continues where it stopped, a loop over a finished epoch starts the next epoch.

    ``state_dict()`` counts the batches already handed out (counted before each is yielded: save after using it).
    """

    def __init__(self, cfg: DataConfig, split: str, batch_size: int, *, seed: int, rank: int = 0,
                 world_size: int = 1, with_keys: bool = False) -> None:
        train = check_split(split)
        super().__init__(batch_size, seed=seed, rank=rank, world_size=world_size, repeat=train,
                         num_workers=cfg.num_workers)
        self.cfg, self.split, self.with_keys, self._train = cfg, split, with_keys, train
        m = self._manifest = read_manifest(cfg.uri, split, "webdataset")
        # Held-out splits are small (often one shard): evaluation uses at most one worker per shard of a rank's
        # share, and ranks may share a shard (each reads its own sample range of it). Training keeps the rule that
        # every reader gets whole shards to itself, and says so up front rather than hang.
        self._workers = cfg.num_workers if train else min(cfg.num_workers, len(m.shards) // world_size)
        slots = self._slots = max(1, self._workers)
        if train and len(m.shards) < world_size * slots:
            raise ValueError(
                f"{join(cfg.uri, split)} has {len(m.shards)} shard(s), fewer than the {world_size} rank(s) × {slots} "
                f"reader(s) per rank = {world_size * slots} readers that must each get a part; write more, smaller "
                f"shards (`tarflow data write --shard-size`, smaller) or use fewer loader workers (data.num_workers)")
        stored = tuple(int(x) for x in m.image_shape)
        if cfg.crop and cfg.crop > min(ImageTransform(cfg.resize).output_shape(stored)[1:]):
            raise ValueError(f"data.crop={cfg.crop} is larger than the images ({stored} stored, resize={cfg.resize})")
        self._plan = EpochPlan([s.num_samples for s in m.shards], train=train, seed=self.seed,
                               batch_size=batch_size, world_size=world_size, slots=slots)
        bpe, runs = self._plan.rank_batches[rank], self._plan.ranges[rank]
        self._setup_epochs(num_samples=m.num_samples, batches_per_epoch=bpe,
                           samples_per_epoch=bpe * batch_size if train else runs[-1][1] - runs[0][0])
        self._urls = [join(cfg.uri, split, s.name) for s in m.shards]
        transform = ImageTransform(cfg.resize, cfg.crop, random_flip=train and cfg.random_flip)
        self._decoder = SampleDecoder(encoding=m.encoding, shape=stored, num_classes=m.num_classes,
                                      transform=transform, seed=self.seed)
        self._corrupt_epoch = [0] * slots  # per worker, this epoch; -1: unknown (state from another rank)

    # -- iteration -----------------------------------------------------------------------------------------------
    def _epoch_started(self) -> None:
        self._corrupt_epoch = [0] * self._slots

    def _epoch_batches(self) -> Iterator[tuple | None]:
        stream = EpochStream(plan=self._plan, urls=self._urls, decoder=self._decoder, epoch=self._epoch,
                             rank=self.rank, shuffle_buffer=self.cfg.shuffle_buffer,
                             skip_corrupt=self.cfg.skip_corrupt, consumed=self._batch,
                             corrupt=list(self._corrupt_epoch))
        loader = self._dataloader(stream, num_workers=self._workers, batch_size=None, worker_init_fn=worker_init)
        for item in loader:
            if "error" in item:
                raise unpack_error(item["error"])
            w = item["worker"]
            if self._corrupt_epoch[w] < 0:
                self._corrupt_epoch[w] = 0
            self._corrupt_epoch[w] += item["corrupt"] + item["ff_corrupt"]
            self._skipped += item["corrupt"]
            if not item["keys"]:
                yield None  # heldout: every sample of this batch was corrupt and skipped (counted, not yielded)
                continue
            batch = (item["images"], item["labels"])
            yield (*batch, list(item["keys"])) if self.with_keys else batch
        if self._batch < self.batches_per_epoch:
            raise RuntimeError(f"epoch {self._epoch} ended after {self._batch} of {self.batches_per_epoch} "
                               f"batches (rank {self.rank}); the shards changed while reading?")

    # -- resumption ----------------------------------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        digest = hashlib.blake2b(digest_size=8)
        for s in self._manifest.shards:
            digest.update(f"{s.name}:{s.num_samples}:{s.sha256}\n".encode())
        return {"format": "webdataset", "split": self.split, "num_workers": self._workers,
                "shuffle_buffer": self.cfg.shuffle_buffer if self._train else 0, "dataset": digest.hexdigest()}

    def _extra_state(self) -> dict[str, Any]:
        return {"rank": self.rank, "corrupt_in_epoch": ",".join(str(c) for c in self._corrupt_epoch)}

    def _load_extra_state(self, state: dict[str, Any], epoch: int, batch: int) -> None:
        corrupt = [int(c) for c in str(state.get("corrupt_in_epoch", "")).split(",") if c != ""]
        if len(corrupt) != self._slots:
            corrupt = [0] * self._slots
        if int(state.get("rank", self.rank)) != self.rank:
            # another rank's counts say nothing about ours; with skipping on, find ours while fast-forwarding
            corrupt = [-1 if self.cfg.skip_corrupt else 0] * self._slots
        self._corrupt_epoch = corrupt


__all__ = ["WebDatasetLoader"]
