"""Reading one reader's run of a webdataset epoch inside a DataLoader worker: webdataset's own pipeline
(``wds.SimpleShardList`` → ``wds.tarfile_to_samples`` → ``wds.shuffle``), decoding, corrupt-sample accounting, and
errors that travel from the workers to the main process as data (see ``webdataset_loader``'s docstring)."""

from __future__ import annotations

import itertools
import random
import sys
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from .codecs import EXTENSIONS, LABEL_EXTENSION, CorruptSampleError, decode_image, decode_label
from .seeding import derive_seed
from .storage import DataSourceError, open_stream
from .transforms import ImageTransform
from .webdataset_plan import EpochPlan, share


# -- s3:// for webdataset ------------------------------------------------------------------------------------------
def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    if not mode.startswith("r"):
        raise ValueError(f"{url}: the s3 handler only reads")
    return open_stream(url)


def register_s3_scheme() -> None:
    """Let webdataset open ``s3://`` URLs with boto3 (idempotent; done at import and again in every worker)."""
    sys.modules["webdataset.gopen"].gopen_schemes["s3"] = _gopen_s3


register_s3_scheme()


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

    def __call__(self, sample: dict, epoch: int) -> tuple[torch.Tensor, int, str]:
        image, label, key = self.check(sample)
        if not image.flags.writeable:  # PIL's arrays are read-only; torch warns about wrapping them
            image = image.copy()
        return self.transform(image, seed=self.seed, epoch=epoch, key=key), label, key


class EpochStream(IterableDataset):
    """One epoch of one rank, as the DataLoader's dataset: each worker yields its batches as dicts carrying the
    worker id and what it consumed; known errors travel as an ``{"error": …}`` item (re-raised, typed, in the main
    process)."""

    def __init__(self, *, plan: EpochPlan, urls: list[str], decoder: SampleDecoder, epoch: int, rank: int,
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
        done = min(share(self.consumed, worker, plan.slots), planned)
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


def unpack_error(packed: dict) -> Exception:
    if packed["kind"] == "corrupt":
        shard, key = packed["shard"], packed["key"]
        return CorruptSampleError(packed["message"].removesuffix(f" (shard {shard}, sample {key})"), shard, key)
    return DataSourceError(packed["message"])


def worker_init(_worker_id: int) -> None:
    register_s3_scheme()

