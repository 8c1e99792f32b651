"""Reading a webdataset epoch inside DataLoader workers: training streams and held-out runs through webdataset's
own pipeline (``wds.SimpleShardList`` → our shard opener → webdataset's tar expander and key grouping →
``wds.shuffle``), decoding, corrupt-sample accounting, shard digests, and errors that travel from the workers to
the main process as data (see ``webdataset_loader``'s docstring)."""

from __future__ import annotations

import hashlib
import itertools
import random
import sys
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from .codecs import EXTENSIONS, LABEL_EXTENSION, CorruptSampleError, decode_image, decode_label
from .seeding import derive_seed
from .storage import DataSourceError, open_stream
from .transforms import ImageTransform
from .verify import digest_mismatch
from .webdataset_plan import HeldoutPlan, StreamPlan, share


# -- s3:// for webdataset ------------------------------------------------------------------------------------------
def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    if not mode.startswith("r"):
        raise ValueError(f"{url}: the s3 handler only reads")
    return open_stream(url)


def register_s3_scheme() -> None:
    """Let webdataset open ``s3://`` URLs with boto3 (idempotent; done at import and again in every worker)."""
    sys.modules["webdataset.gopen"].gopen_schemes["s3"] = _gopen_s3


register_s3_scheme()


# -- reading one run of an epoch's sequence -------------------------------------------------------------------------
class _HashingStream:
    """A shard's byte stream that hashes what is read through it (``data.verify=sha256``)."""

    def __init__(self, stream) -> None:
        self._stream, self.digest = stream, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self.digest.update(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass

    def close(self) -> None:
        self._stream.close()

    def __getattr__(self, name: str):  # anything else the tar reader asks of a file object
        if name == "_stream":
            raise AttributeError(name)
        return getattr(self._stream, name)


class _ShardOpener:
    """The pipeline stage before webdataset's tar reader: opens each shard (``gopen``, s3:// through boto3),
    remembers which one is being read (for error messages) and closes it once the reader asks for the next one
    (webdataset leaves them open). With ``hashes`` (url → sha256 from the manifest) it hashes every shard as it is
    read and, when the reader is done with it, reads what is left of it and compares."""

    def __init__(self, hashes: dict[str, str] | None, where: str) -> None:
        self.url = "?"
        self._hashes, self._where = hashes, where
        self._stream = None

    def __call__(self, source):
        for item in source:
            self.finish()  # the tar reader asks for the next shard: it has read the previous one to its end
            self.url = item["url"]
            stream = sys.modules["webdataset.gopen"].gopen(self.url)
            self._stream = _HashingStream(stream) if self._hashes is not None else stream
            yield {**item, "stream": self._stream}
        self.finish()

    def finish(self) -> None:
        """Done with the current shard: check its digest (reading its rest first), then close it."""
        stream = self._stream
        try:
            if isinstance(stream, _HashingStream):
                stream.drain()
                actual, expected = stream.digest.hexdigest(), self._hashes[self.url]
                if actual != expected:
                    raise digest_mismatch(self.url, actual, expected, self._where)
        finally:
            self.close()

    def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            try:
                stream.close()
            except Exception:  # closing is best effort
                pass


def _select(samples, segments: list[tuple[int, int, int]], urls: list[str], counts: list[int],
            offsets: list[int], finish) -> Iterator[dict]:
    """Keep each segment's [start, stop) samples of its shard, numbered with their index in the split
    (``__index__``), checking every shard read to its end holds exactly the manifest's count (a truncated or
    rewritten shard fails here, naming it); ``finish()`` ends a last shard that the run stops inside."""
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
                sample["__index__"] = offsets[shard] + index
                yield sample
        if stop == n:  # read to the shard's end: nothing more may follow from it
            pending = next(it, None)
            if pending is not None and pending.get("__url__") == url:
                raise DataSourceError(f"shard {url} holds more than the {n} samples its manifest lists")
            if i == len(segments) - 1:
                return
        else:  # only a run's last segment stops inside its shard
            finish()
            return


@dataclass(frozen=True)
class ShardSet:
    """The split's shards as readers see them: URLs, the manifest's counts, the index of each shard's first
    sample, and (``data.verify=sha256``) the digests to compare."""

    urls: list[str]
    counts: list[int]
    offsets: list[int]
    hashes: dict[str, str] | None
    manifest_uri: str


def raw_samples(shards: ShardSet, segments: list[tuple[int, int, int]], shuffle_buffer: int = 0,
                rng: random.Random | None = None) -> Iterator[dict]:
    """The undecoded samples of one run (its ``segments``), through a shuffle buffer when ``shuffle_buffer > 1``."""
    if not segments:
        return
    opener = _ShardOpener(shards.hashes, shards.manifest_uri)
    stages = [wds.SimpleShardList([shards.urls[s] for s, _, _ in segments]), opener,
              tar_file_expander, group_by_keys,
              lambda src: _select(src, segments, shards.urls, shards.counts, shards.offsets, opener.finish)]
    if shuffle_buffer > 1:
        stages.append(wds.shuffle(shuffle_buffer, initial=shuffle_buffer, rng=rng))
    it = iter(wds.DataPipeline(*stages))
    try:
        yield from _guarded(it, opener)
    finally:
        opener.close()


def _guarded(it: Iterator[dict], opener: _ShardOpener) -> Iterator[dict]:
    while True:
        try:
            sample = next(it)
        except StopIteration:
            return
        except (DataSourceError, CorruptSampleError) as e:
            # webdataset appends the URL/stream to exception args; keep the message clean
            raise _clean(e) from None
        except FileNotFoundError:
            raise DataSourceError(f"shard {opener.url} does not exist (the manifest lists it)") from None
        except Exception as e:
            what = e.strerror if isinstance(e, OSError) and e.strerror else (e.args[0] if e.args else "")
            what = str(what).split(" @ ")[0]  # webdataset appends " @ <stream repr>"
            raise DataSourceError(f"cannot read shard {opener.url}: {type(e).__name__}: {what} "
                                  f"(truncated or not a tar file?)") from e
        yield sample


@dataclass(frozen=True)
class SampleDecoder:
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

    def __call__(self, sample: dict, epoch: int) -> tuple[torch.Tensor, int, int]:
        """(float image, label, index in the split), flipped per (seed, epoch, key); or CorruptSampleError."""
        image, label, key = self.check(sample)
        if not image.flags.writeable:  # PIL's arrays are read-only; torch warns about wrapping them
            image = image.copy()
        return self.transform(image, seed=self.seed, epoch=epoch, key=key), label, sample["__index__"]

    def stack(self, good: list[tuple[torch.Tensor, int, int]]) -> dict:
        if good:
            images = torch.stack([g[0] for g in good])
        else:  # heldout: all of a batch's samples were corrupt (counted, not yielded)
            images = torch.empty((0, *self.transform.output_shape(self.shape)))
        # labels and indices as lists: pickled with the item, where each tensor would cost a shared-memory hand-over
        return {"images": images, "labels": [g[1] for g in good], "indices": [g[2] for g in good]}


def _no_sample_decodes(run_size: int, error: CorruptSampleError) -> DataSourceError:
    return DataSourceError(f"none of the {run_size} samples of a reader's run decodes; the last: {error}")


# -- training: streams ---------------------------------------------------------------------------------------------
class _StreamReader:
    """One training stream of one epoch: its run read through its own shuffle buffer seeded by (seed, epoch,
    stream), started again from its beginning when used up (only corrupt samples skipped can need that)."""

    def __init__(self, plan: StreamPlan, shards: ShardSet, decoder: SampleDecoder, *, epoch: int, stream: int,
                 shuffle_buffer: int, skip_corrupt: bool) -> None:
        self.plan, self.shards, self.decoder = plan, shards, decoder
        self.epoch, self.stream, self.shuffle_buffer, self.skip_corrupt = epoch, stream, shuffle_buffer, skip_corrupt
        lo, hi = plan.runs[stream]
        self.run_size = hi - lo
        self._pass: Iterator[dict] = iter(())
        self._streak = 0

    def _next_raw(self) -> dict:
        while True:
            sample = next(self._pass, None)
            if sample is not None:
                return sample
            rng = random.Random(derive_seed("samples", self.plan.seed, self.epoch, self.stream))
            self._pass = raw_samples(self.shards, self.plan.segments(self.epoch, self.stream),
                                     self.shuffle_buffer, rng)

    def skip(self, n: int) -> None:
        """Drop ``n`` raw samples undecoded (positions already delivered or skipped before a resume)."""
        for _ in range(n):
            self._next_raw()

    def find(self, good: int) -> int:
        """Move past the first ``good`` decodable samples, decoding to tell them apart; the corrupt ones met."""
        corrupt = 0
        while good:
            sample = self._next_raw()
            try:
                self.decoder.check(sample)
                good, self._streak = good - 1, 0
            except CorruptSampleError as e:
                corrupt += 1
                self._count_corrupt(e)
        return corrupt

    def take(self, n: int) -> tuple[list, int]:
        """The next ``n`` decoded samples, and how many corrupt ones were skipped to get them."""
        good, corrupt = [], 0
        while len(good) < n:
            sample = self._next_raw()
            try:
                good.append(self.decoder(sample, self.epoch))
                self._streak = 0
            except CorruptSampleError as e:
                if not self.skip_corrupt:
                    raise
                corrupt += 1
                self._count_corrupt(e)
        return good, corrupt

    def _count_corrupt(self, error: CorruptSampleError) -> None:
        self._streak += 1
        if self._streak >= self.run_size:
            raise _no_sample_decodes(self.run_size, error)

    def finish(self) -> None:
        """Read the rest of the current pass undecoded (cheap: what is left is mostly in the shuffle buffer), so
        that its last shard is checked (``data.verify=sha256``) and closed."""
        for _ in self._pass:
            pass


class TrainEpoch(IterableDataset):
    """One epoch of one rank's training streams, as the DataLoader's dataset: every reader slot (worker) yields
    one item per global step holding a chunk of ``plan.chunk`` samples of each of its streams (concatenated in the
    order of ``item["streams"]``); known errors travel as an ``{"error": …}`` item (re-raised, typed, in the main
    process)."""

    def __init__(self, *, plan: StreamPlan, shards: ShardSet, decoder: SampleDecoder, epoch: int, rank: int,
                 slots: int, shuffle_buffer: int, skip_corrupt: bool, first_step: int,
                 corrupt: list[int]) -> None:
        super().__init__()
        self.plan, self.shards, self.decoder = plan, shards, decoder
        self.epoch, self.rank, self.slots = epoch, rank, slots
        self.shuffle_buffer, self.skip_corrupt = shuffle_buffer, skip_corrupt
        self.first_step = first_step  # global steps of this epoch already consumed
        self.corrupt = corrupt        # per stream: corrupt samples skipped before first_step (-1: not known)

    def __iter__(self):
        register_s3_scheme()  # spawned/forkserver workers import this module anyway; be explicit
        info = get_worker_info()
        worker = info.id if info is not None else 0
        try:
            yield from self._steps(worker)
        except (CorruptSampleError, DataSourceError) as e:
            yield {"error": _pack_error(e), "worker": worker}

    def _steps(self, worker: int):
        plan, k0 = self.plan, self.first_step
        streams = plan.worker_streams(self.rank, worker, self.slots)
        readers = {s: _StreamReader(plan, self.shards, self.decoder, epoch=self.epoch, stream=s,
                                    shuffle_buffer=self.shuffle_buffer, skip_corrupt=self.skip_corrupt)
                   for s in streams}
        found = {}
        for s, reader in readers.items():
            known = self.corrupt[s]
            if known >= 0 or not self.skip_corrupt:
                reader.skip(k0 * plan.chunk + max(known, 0))
            else:  # a state that does not know this stream's skips: find them by decoding
                found[s] = reader.find(k0 * plan.chunk)
        for step in range(k0, plan.steps):
            good, corrupt = [], {}
            for s, reader in readers.items():
                chunk, corrupt[s] = reader.take(plan.chunk)
                good += chunk
            # one tensor per item, the chunks in this worker's stream order (one shared-memory hand-over, not many)
            yield {**self.decoder.stack(good), "step": step, "worker": worker, "streams": streams,
                   "corrupt": corrupt, "found": found}
            found = {}
        for reader in readers.values():
            reader.finish()


# -- held-out: fixed ranges per rank and worker --------------------------------------------------------------------
class HeldoutEpoch(IterableDataset):
    """One held-out epoch of one rank: each worker yields its batches (manifest order) as dicts; errors travel
    as an ``{"error": …}`` item."""

    def __init__(self, *, plan: HeldoutPlan, shards: ShardSet, decoder: SampleDecoder, epoch: int, rank: int,
                 skip_corrupt: bool, consumed: int) -> None:
        super().__init__()
        self.plan, self.shards, self.decoder = plan, shards, decoder
        self.epoch, self.rank, self.skip_corrupt = epoch, rank, skip_corrupt
        self.consumed = consumed  # batches of this epoch the rank already handed out

    def __iter__(self):
        register_s3_scheme()
        info = get_worker_info()
        # The DataLoader visits its workers 0, 1, … from the start of every pass; a resumed pass must start with the
        # worker that holds the rank's next batch (batch j belongs to reader j mod W), so rotate the ids.
        worker = ((info.id if info is not None else 0) + self.consumed) % self.plan.slots
        try:
            yield from self._batches(worker)
        except (CorruptSampleError, DataSourceError) as e:
            yield {"error": _pack_error(e), "worker": worker}

    def _batches(self, worker: int):
        plan, b = self.plan, self.plan.batch_size
        planned = plan.worker_batches[self.rank][worker]
        done = min(share(self.consumed, worker, plan.slots), planned)
        if done >= planned:
            return
        raw = raw_samples(self.shards, plan.segments(self.rank, worker))
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
            yield {**self.decoder.stack(good), "worker": worker, "corrupt": corrupt}
        _consume(raw, 1)  # ends the run: its last shard is checked (data.verify=sha256) and closed


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


def unpack_error(packed: dict) -> Exception:
    if packed["kind"] == "corrupt":
        shard, key = packed["shard"], packed["key"]
        return CorruptSampleError(packed["message"].removesuffix(f" (shard {shard}, sample {key})"), shard, key)
    return DataSourceError(packed["message"])


def worker_init(_worker_id: int) -> None:
    register_s3_scheme()

