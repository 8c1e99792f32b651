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
import itertools
import random
import sys
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .codecs import EXTENSIONS, LABEL_EXTENSION, CorruptSampleError, decode_image, decode_label
from .config import DataConfig
from .manifest import Manifest, read_manifest
from .storage import DataSourceError, join, open_stream
from .seeding import derive_seed
from .transforms import ImageTransform

SPLITS = ("train", "heldout")


# -- s3:// for webdataset ------------------------------------------------------------------------------------------
def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    if not mode.startswith("r"):
        raise ValueError(f"{url}: the s3 handler only reads")
    return open_stream(url)


def register_s3_scheme() -> None:
    """Let webdataset open ``s3://`` URLs with boto3 (idempotent; done at import and again in every worker)."""
    sys.modules["webdataset.gopen"].gopen_schemes["s3"] = _gopen_s3


register_s3_scheme()


# -- planning ------------------------------------------------------------------------------------------------------
def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _share(batches: int, w: int, slots: int) -> int:
    """Of a rank's first ``batches`` batches, how many come from worker ``w`` (batch j is worker j mod slots)."""
    return _ceil_div(batches - w, slots) if batches > w else 0


class _Plan:
    """Who reads which positions of an epoch's sample sequence (see the module docstring)."""

    def __init__(self, counts: list[int], *, train: bool, seed: int, batch_size: int, world_size: int,
                 slots: int) -> None:
        self.counts, self.train, self.seed = list(counts), train, seed
        self.batch_size, self.world_size, self.slots = batch_size, world_size, slots
        n, r_, w_, b = sum(counts), world_size, slots, batch_size
        self.rank_batches: list[int] = []
        self.worker_batches: list[list[int]] = []
        self.ranges: list[list[tuple[int, int]]] = []
        if train:
            k = n // (r_ * b)
            per_worker = [_share(k, w, w_) for w in range(w_)]
            surplus, readers = n - r_ * k * b, r_ * w_
            pos = 0
            for r in range(r_):
                runs = []
                for w in range(w_):
                    s = r * w_ + w
                    size = per_worker[w] * b + surplus // readers + (1 if s < surplus % readers else 0)
                    runs.append((pos, pos + size))
                    pos += size
                self.rank_batches.append(k)
                self.worker_batches.append(per_worker)
                self.ranges.append(runs)
            assert pos == n
        else:
            for r in range(r_):
                start, stop = r * n // r_, (r + 1) * n // r_
                k = _ceil_div(stop - start, b)
                per_worker = [_share(k, w, w_) for w in range(w_)]
                runs, pos = [], start
                for w in range(w_):
                    end = min(stop, pos + per_worker[w] * b)
                    runs.append((pos, end))
                    pos = end
                self.rank_batches.append(k)
                self.worker_batches.append(per_worker)
                self.ranges.append(runs)

    def shard_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.counts)))
        if self.train:
            random.Random(derive_seed("shards", self.seed, epoch)).shuffle(order)
        return order

    def segments(self, epoch: int, rank: int, worker: int) -> list[tuple[int, int, int]]:
        """(shard index, first sample, end sample) in reading order for one reader's run in ``epoch``."""
        a, b = self.ranges[rank][worker]
        out, offset = [], 0
        for shard in self.shard_order(epoch):
            n = self.counts[shard]
            lo, hi = max(a, offset), min(b, offset + n)
            if lo < hi:
                out.append((shard, lo - offset, hi - offset))
            offset += n
            if offset >= b:
                break
        return out


# -- reading one reader's run --------------------------------------------------------------------------------------
class _UrlTracker:
    """A pipeline stage between the shard list and the tar reader: remembers which shard is being read (for error
    messages) and closes each shard's stream once the reader asks for the next (webdataset leaves them open)."""

    def __init__(self) -> None:
        self.url = "?"
        self._current: dict | None = None

    def __call__(self, source):
        for item in source:
            self.close()
            self.url, self._current = item["url"], item  # the tar reader adds the opened "stream" to this dict
            yield item
        self.close()

    def close(self) -> None:
        stream = self._current.get("stream") if self._current is not None else None
        self._current = None
        if stream is not None:
            try:
                stream.close()
            except Exception:  # closing is best effort
                pass


def _select(samples, segments: list[tuple[int, int, int]], urls: list[str], counts: list[int]):
    """Keep each segment's [start, stop) samples of its shard, checking every shard read to its end holds exactly
    the manifest's count (a truncated or rewritten shard fails here, naming it)."""
    it = iter(samples)
    pending = None
    for i, (shard, start, stop) in enumerate(segments):
        url, n = urls[shard], counts[shard]
        for index in range(stop):
            sample = pending if pending is not None else next(it, None)
            pending = None
            if sample is None or sample.get("__url__") != url:
                raise DataSourceError(f"shard {url} ended after {index} samples but the manifest lists {n} "
                                      f"(truncated or rewritten since the manifest was written?)")
            if index >= start:
                yield sample
        if stop == n:  # read to the shard's end: nothing more may follow from it
            pending = next(it, None)
            if pending is not None and pending.get("__url__") == url:
                raise DataSourceError(f"shard {url} holds more than the {n} samples its manifest lists")
            if i == len(segments) - 1:
                return


@dataclass(frozen=True)
class _Decoder:
    encoding: str
    shape: tuple[int, int, int]  # as stored (the manifest's)
    num_classes: int
    transform: ImageTransform
    seed: int

    def check(self, sample: dict) -> tuple[Any, int, str]:
        """Decode without the transform: (uint8 image, label, key), or CorruptSampleError."""
        key, shard = sample.get("__key__", "?"), sample.get("__url__", "?")
        ext = EXTENSIONS[self.encoding]
        if ext not in sample:
            raise CorruptSampleError(f"sample has no .{ext} image (members: "
                                     f"{sorted(k for k in sample if not k.startswith('__'))})", shard, key)
        if LABEL_EXTENSION not in sample:
            raise CorruptSampleError(f"sample has no .{LABEL_EXTENSION} label", shard, key)
        image = decode_image(sample[ext], self.encoding, self.shape, shard, key)
        label = decode_label(sample[LABEL_EXTENSION], shard, key)
        if self.num_classes and not 0 <= label < self.num_classes:
            raise CorruptSampleError(f"label {label} is outside [0, {self.num_classes})", shard, key)
        return image, label, key

    def __call__(self, sample: dict, epoch: int) -> tuple[torch.Tensor, int, str]:
        image, label, key = self.check(sample)
        if not image.flags.writeable:  # PIL's arrays are read-only; torch warns about wrapping them
            image = image.copy()
        return self.transform(image, seed=self.seed, epoch=epoch, key=key), label, key


class _EpochStream(IterableDataset):
    """One epoch of one rank, as the DataLoader's dataset: each worker yields its batches as dicts carrying the
    worker id and what it consumed; known errors travel as an ``{"error": …}`` item (re-raised, typed, in the main
    process)."""

    def __init__(self, *, plan: _Plan, urls: list[str], decoder: _Decoder, epoch: int, rank: int,
                 shuffle_buffer: int, skip_corrupt: bool, consumed: int, corrupt: list[int]) -> None:
        super().__init__()
        self.plan, self.urls, self.decoder = plan, urls, decoder
        self.epoch, self.rank = epoch, rank
        self.shuffle_buffer, self.skip_corrupt = shuffle_buffer, skip_corrupt
        self.consumed = consumed  # batches of this epoch the rank already handed out
        self.corrupt = corrupt    # per worker: corrupt samples skipped this epoch so far (-1: not known)

    def __iter__(self):
        register_s3_scheme()  # spawned/forkserver workers import this module anyway; be explicit
        info = get_worker_info()
        # The DataLoader visits its workers 0, 1, … from the start of every pass; a resumed pass must start with the
        # worker that holds the rank's next batch (batch j belongs to reader j mod W), so rotate the ids.
        worker = ((info.id if info is not None else 0) + self.consumed) % self.plan.slots
        try:
            yield from self._batches(worker)
        except (CorruptSampleError, DataSourceError) as e:
            yield {"error": _pack_error(e), "worker": worker}

    # raw (undecoded) samples of this worker's run, shuffled for training
    def _raw(self, worker: int) -> Iterator[dict]:
        segments = self.plan.segments(self.epoch, self.rank, worker)
        if not segments:
            return
        tracker = _UrlTracker()
        stages = [wds.SimpleShardList([self.urls[s] for s, _, _ in segments]), tracker, wds.tarfile_to_samples(),
                  lambda src: _select(src, segments, self.urls, self.plan.counts)]
        if self.plan.train and self.shuffle_buffer > 1:
            rng = random.Random(derive_seed("samples", self.plan.seed, self.epoch, self.rank, worker))
            stages.append(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng))
        it = iter(wds.DataPipeline(*stages))
        try:
            yield from self._guarded(it, tracker)
        finally:
            tracker.close()

    @staticmethod
    def _guarded(it: Iterator[dict], tracker: _UrlTracker) -> Iterator[dict]:
        while True:
            try:
                sample = next(it)
            except StopIteration:
                return
            except (DataSourceError, CorruptSampleError) as e:
                # webdataset appends the URL/stream to exception args; keep the message clean
                raise _clean(e) from None
            except FileNotFoundError:
                raise DataSourceError(f"shard {tracker.url} does not exist (the manifest lists it)") from None
            except Exception as e:
                what = e.strerror if isinstance(e, OSError) and e.strerror else (e.args[0] if e.args else "")
                what = str(what).split(" @ ")[0]  # webdataset appends " @ <stream repr>"
                raise DataSourceError(f"cannot read shard {tracker.url}: {type(e).__name__}: {what} "
                                      f"(truncated or not a tar file?)") from e
            yield sample

    def _cyclic(self, worker: int) -> Iterator[dict]:
        """The run's raw stream, started again from its beginning when used up (training pads short workers)."""
        while True:
            yield from self._raw(worker)

    def _batches(self, worker: int):
        plan, b = self.plan, self.plan.batch_size
        planned = plan.worker_batches[self.rank][worker]
        done = min(_share(self.consumed, worker, plan.slots), planned)
        if done >= planned:
            return
        run = plan.ranges[self.rank][worker]
        run_size = run[1] - run[0]
        if not plan.train:
            raw = self._raw(worker)
            _consume(raw, done * b)  # heldout batches are fixed position ranges: no decoding to skip
            for _ in range(planned - done):
                chunk = list(itertools.islice(raw, b))
                good, corrupt = [], 0
                for sample in chunk:
                    try:
                        good.append(self.decoder(sample, self.epoch))
                    except CorruptSampleError:
                        if not self.skip_corrupt:
                            raise
                        corrupt += 1
                yield self._batch(good, worker, len(chunk), corrupt, 0)
            return

        raw = self._cyclic(worker)
        ff_corrupt = 0
        known = self.corrupt[worker] if worker < len(self.corrupt) else -1
        if known >= 0 or not self.skip_corrupt:
            _consume(raw, done * b + max(known, 0))  # undecoded: the samples already delivered (and skipped)
        else:  # a state from another rank with skipping on: find this rank's corrupt samples by decoding
            need, streak = done * b, 0
            while need:
                sample = next(raw)
                try:
                    self.decoder.check(sample)
                    need, streak = need - 1, 0
                except CorruptSampleError as e:
                    ff_corrupt, streak = ff_corrupt + 1, streak + 1
                    self._check_streak(streak, run_size, e)
        streak = 0
        for _ in range(planned - done):
            good, consumed, corrupt = [], 0, 0
            while len(good) < b:
                sample = next(raw)
                consumed += 1
                try:
                    good.append(self.decoder(sample, self.epoch))
                    streak = 0
                except CorruptSampleError as e:
                    if not self.skip_corrupt:
                        raise
                    corrupt, streak = corrupt + 1, streak + 1
                    self._check_streak(streak, run_size, e)
            yield self._batch(good, worker, consumed, corrupt, ff_corrupt)
            ff_corrupt = 0

    @staticmethod
    def _check_streak(streak: int, run_size: int, error: CorruptSampleError) -> None:
        if streak >= run_size:
            raise DataSourceError(f"none of the {run_size} samples of a reader's run decodes; the last: {error}")

    def _batch(self, good, worker, consumed, corrupt, ff_corrupt) -> dict:
        if good:
            images = torch.stack([g[0] for g in good])
        else:  # heldout: all of this batch's samples were corrupt (counted, not yielded)
            images = torch.empty((0, *self.decoder.transform.output_shape(self.decoder.shape)))
        return {"images": images, "labels": torch.tensor([g[1] for g in good], dtype=torch.int64),
                "keys": [g[2] for g in good], "worker": worker, "consumed": consumed, "corrupt": corrupt,
                "ff_corrupt": ff_corrupt}


def _consume(it: Iterator, n: int) -> None:
    for _ in itertools.islice(it, n):
        pass


def _clean(e: Exception) -> Exception:
    """Our error with only its message (webdataset appends URLs and streams to ``args``)."""
    if isinstance(e, CorruptSampleError):
        message = str(e.args[0]).removesuffix(f" (shard {e.shard}, sample {e.key})")
        return CorruptSampleError(message, e.shard, e.key)
    return type(e)(e.args[0] if e.args else "")


def _pack_error(e: Exception) -> dict:
    e = _clean(e)
    if isinstance(e, CorruptSampleError):
        return {"kind": "corrupt", "message": str(e), "shard": e.shard, "key": e.key}
    return {"kind": "source", "message": str(e)}


def _unpack_error(packed: dict) -> Exception:
    if packed["kind"] == "corrupt":
        shard, key = packed["shard"], packed["key"]
        return CorruptSampleError(packed["message"].removesuffix(f" (shard {shard}, sample {key})"), shard, key)
    return DataSourceError(packed["message"])


def _worker_init(_worker_id: int) -> None:
    register_s3_scheme()


# -- the loader ----------------------------------------------------------------------------------------------------
class WebDatasetLoader:
    """Batches ``(images float32 (B,C,H,W) in [-1,1], labels int64 (B,))`` — plus the list of sample keys with
    ``with_keys`` — for one rank, read from webdataset tar shards (see the module docstring for the plan).

    ``train``: shuffled, endless, K full batches per epoch on every rank, flips per ``cfg.random_flip``.
    ``heldout``: manifest order, one epoch per ``for`` loop, every sample once across ranks, no flips; a loop that
    was interrupted continues where it stopped, a loop over a finished epoch starts the next epoch.

    ``state_dict()`` counts the batches already handed out (counted before each is yielded: save after using it).
    """

    def __init__(self, cfg: DataConfig, split: str, batch_size: int, *, seed: int, rank: int = 0,
                 world_size: int = 1, with_keys: bool = False) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        if cfg.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {cfg.num_workers}")
        self.cfg, self.split, self.batch_size = cfg, split, batch_size
        self.seed, self.rank, self.world_size, self.with_keys = int(seed), rank, world_size, with_keys
        self._train = split == "train"
        self.manifest = read_manifest(cfg.uri, split, "webdataset")
        m = self.manifest
        # Held-out splits are small (often one shard): evaluation uses at most one worker per shard of a rank's
        # share, and ranks may share a shard (each reads its own sample range of it). Training keeps the rule that
        # every reader gets whole shards to itself, and says so up front rather than hang.
        self._workers = cfg.num_workers if self._train else min(cfg.num_workers, len(m.shards) // world_size)
        slots = max(1, self._workers)
        if self._train and len(m.shards) < world_size * slots:
            raise ValueError(
                f"{join(cfg.uri, split)} has {len(m.shards)} shard(s), fewer than the {world_size} rank(s) × {slots} "
                f"reader(s) per rank = {world_size * slots} readers that must each get a part; write more, smaller "
                f"shards (`tarflow data write --shard-size`, smaller) or use fewer loader workers (data.num_workers)")
        stored = tuple(int(x) for x in m.image_shape)
        self.image_shape = ImageTransform(cfg.resize, cfg.crop).output_shape(stored)
        if cfg.crop and cfg.crop > min(ImageTransform(cfg.resize).output_shape(stored)[1:]):
            raise ValueError(f"data.crop={cfg.crop} is larger than the images ({stored} stored, resize={cfg.resize})")
        self._plan = _Plan([s.num_samples for s in m.shards], train=self._train, seed=self.seed,
                           batch_size=batch_size, world_size=world_size, slots=slots)
        self._batches_per_epoch = self._plan.rank_batches[rank]
        if self._train and self._batches_per_epoch == 0:
            raise ValueError(f"{m.num_samples} samples give no batch of {batch_size} per rank across {world_size} "
                             "ranks; an endless loader would never yield (lower the batch size)")
        self._urls = [join(cfg.uri, split, s.name) for s in m.shards]
        transform = ImageTransform(cfg.resize, cfg.crop, random_flip=self._train and cfg.random_flip)
        self._decoder = _Decoder(encoding=m.encoding, shape=stored, num_classes=m.num_classes, transform=transform,
                                 seed=self.seed)
        self._slots = slots
        self._epoch = 0
        self._batch = 0
        self._corrupt_epoch = [0] * slots  # per worker, this epoch; -1: unknown (state from another rank)
        self._skipped = 0

    # -- public properties ---------------------------------------------------------------------------------------
    @property
    def batches_per_epoch(self) -> int:
        """Batches this rank yields per epoch (heldout: planned, a batch whose samples are all corrupt is skipped)."""
        return self._batches_per_epoch

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from (before a pending roll-over at the end of an epoch)."""
        return self._epoch

    @property
    def num_samples(self) -> int:
        """Samples this rank yields per epoch (train: batches × batch size; heldout: its part of the split)."""
        r = self._plan.ranges[self.rank]
        return self._batches_per_epoch * self.batch_size if self._train else r[-1][1] - r[0][0]

    samples_per_epoch = num_samples

    @property
    def total_samples(self) -> int:
        """Samples in the split (all ranks)."""
        return self.manifest.num_samples

    @property
    def num_shards(self) -> int:
        return len(self.manifest.shards)

    @property
    def skipped_corrupt(self) -> int:
        """Corrupt samples skipped (``data.skip_corrupt``) in the batches handed out so far, all workers."""
        return self._skipped

    # -- iteration -----------------------------------------------------------------------------------------------
    def _next_epoch(self) -> None:
        self._epoch, self._batch = self._epoch + 1, 0
        self._corrupt_epoch = [0] * self._slots

    def __iter__(self) -> Iterator[tuple]:
        if self._batch >= self._batches_per_epoch:  # a finished epoch: a new loop starts the next one
            self._next_epoch()
        while True:
            if self._batch >= self._batches_per_epoch:
                if not self._train:
                    return
                self._next_epoch()
            yield from self._run_epoch()

    def _run_epoch(self) -> Iterator[tuple]:
        stream = _EpochStream(plan=self._plan, urls=self._urls, decoder=self._decoder, epoch=self._epoch,
                              rank=self.rank, shuffle_buffer=self.cfg.shuffle_buffer,
                              skip_corrupt=self.cfg.skip_corrupt, consumed=self._batch,
                              corrupt=list(self._corrupt_epoch))
        # Its own generator: a DataLoader otherwise draws its workers' base seed from the global RNG, which the
        # trainer's noise comes from, and a resumed run starts its loaders at other points than the original.
        loader = DataLoader(stream, batch_size=None, num_workers=self._workers,
                            worker_init_fn=_worker_init if self._workers else None,
                            generator=torch.Generator().manual_seed(derive_seed("workers", self.seed, self._epoch)))
        for item in loader:
            if "error" in item:
                raise _unpack_error(item["error"])
            w = item["worker"]
            if self._corrupt_epoch[w] < 0:
                self._corrupt_epoch[w] = 0
            self._corrupt_epoch[w] += item["corrupt"] + item["ff_corrupt"]
            self._skipped += item["corrupt"]
            self._batch += 1  # counted before the yield: a state saved after using this batch resumes after it
            if not item["keys"]:
                continue  # heldout: every sample of this batch was corrupt and skipped
            batch = (item["images"], item["labels"])
            yield (*batch, list(item["keys"])) if self.with_keys else batch
        if self._batch < self._batches_per_epoch:
            raise RuntimeError(f"epoch {self._epoch} ended after {self._batch} of {self._batches_per_epoch} batches "
                               f"(rank {self.rank}); the shards changed while reading?")

    # -- resumption ----------------------------------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        m = self.manifest
        digest = hashlib.blake2b(digest_size=8)
        for s in m.shards:
            digest.update(f"{s.name}:{s.num_samples}:{s.sha256}\n".encode())
        return {"format": "webdataset", "split": self.split, "seed": self.seed, "world_size": self.world_size,
                "batch_size": self.batch_size, "num_workers": self._workers,
                "shuffle_buffer": self.cfg.shuffle_buffer if self._train else 0,
                "num_samples": m.num_samples, "dataset": digest.hexdigest()}

    def state_dict(self) -> dict[str, Any]:
        """Plain ints and strings: position, counters and the identity of the setup."""
        return {"epoch": self._epoch, "batches_in_epoch": self._batch, "rank": self.rank,
                "skipped_corrupt": self._skipped,
                "corrupt_in_epoch": ",".join(str(c) for c in self._corrupt_epoch), **self._identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = self._identity()
        missing = [k for k in ("epoch", "batches_in_epoch", *expected) if k not in state]
        if missing:
            raise ValueError(f"loader state lacks {missing} (not a webdataset loader state?)")
        differ = [f"{k}: saved {state[k]!r}, now {v!r}" for k, v in expected.items() if str(state[k]) != str(v)]
        if differ:
            raise ValueError("loader state is from a different setup (" + "; ".join(differ) + ")")
        epoch, batch = int(state["epoch"]), int(state["batches_in_epoch"])
        if epoch < 0 or not 0 <= batch <= self._batches_per_epoch:
            raise ValueError(f"loader state epoch={epoch} batches_in_epoch={batch} out of range "
                             f"(batches_per_epoch={self._batches_per_epoch})")
        corrupt = [int(c) for c in str(state.get("corrupt_in_epoch", "")).split(",") if c != ""]
        if len(corrupt) != self._slots:
            corrupt = [0] * self._slots
        if int(state.get("rank", self.rank)) != self.rank:
            # another rank's counts say nothing about ours; with skipping on, find ours while fast-forwarding
            corrupt = [-1 if self.cfg.skip_corrupt else 0] * self._slots
        self._epoch, self._batch = epoch, batch
        self._corrupt_epoch = corrupt
        self._skipped = int(state.get("skipped_corrupt", 0))


__all__ = ["WebDatasetLoader", "register_s3_scheme"]
