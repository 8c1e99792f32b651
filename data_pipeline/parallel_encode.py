"""Preparing samples for shards (load, resize, encode as PNG/JPEG/raw) in worker processes, handed back in the
source's order, so that the shards a writer assembles from them do not depend on the number of workers.

Workers are forked: they inherit the source (its arrays, its file list) instead of receiving it pickled, which an
in-memory source of many gigabytes could not afford, and a source may hold closures. A worker prepares a chunk of
consecutive positions; at most a few chunks per worker are in flight, so memory stays bounded however fast the
workers are. With one worker everything happens in this process.
"""

from __future__ import annotations

import collections
import itertools
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from typing import Iterator

from .codecs import encode_image
from .sources import Source

EncodedSample = tuple[str, bytes, int]  # key, encoded image, label
CHUNK = 64            # positions per task: about 50 ms of work for a 64×64 image, far above the hand-over cost
CHUNKS_PER_WORKER = 4  # in flight per worker: enough to keep it busy while this process writes a shard

_worker_source: Source | None = None
_worker_encoding = ""


def _start_worker(source: Source, encoding: str) -> None:
    global _worker_source, _worker_encoding
    _worker_source, _worker_encoding = source, encoding


def _encode(samples, encoding: str) -> Iterator[EncodedSample]:
    for key, image, label in samples:
        yield key, encode_image(image, encoding), int(label)


def _encode_chunk(split: str, start: int, stop: int, samples: list | None
                  ) -> tuple[list[EncodedSample], Exception | None]:
    """In a worker: the samples at ``start:stop`` (loaded here when the source can read a position, else given),
    and the error that stopped it early, if any: the samples before a bad one still go into finished shards."""
    if samples is None:
        samples = _worker_source.samples(split, start, stop)
    done = []
    try:
        for sample in _encode(samples, _worker_encoding):
            done.append(sample)
    except Exception as e:  # handed back with what was done (and re-raised there)
        return done, e
    return done, None


def check_workers(workers: int) -> None:
    if workers < 1:
        raise ValueError(f"--workers must be at least 1 (processes preparing images), got {workers}")


class SampleEncoder:
    """``with SampleEncoder(source, "png", workers=4) as encoder: for key, data, label in encoder.encoded(...)``"""

    def __init__(self, source: Source, encoding: str, workers: int = 1):
        check_workers(workers)
        self.source, self.encoding, self.workers = source, encoding, workers
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> "SampleEncoder":
        if self.workers > 1:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("fork"),
                                             initializer=_start_worker, initargs=(self.source, self.encoding))
            self._pool.submit(int).result()  # fork every worker now, before this process starts threads
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def encoded(self, split: str, start: int, stop: int) -> Iterator[EncodedSample]:
        """The samples at positions ``start:stop`` of ``split``, encoded, in order."""
        if self._pool is None:
            yield from _encode(self.source.samples(split, start, stop), self.encoding)
            return
        chunks = ((a, min(a + CHUNK, stop)) for a in range(start, stop, CHUNK))
        if self.source.sample_at is None:  # only iterable: this process loads, the workers encode
            raw = self.source.samples(split, start, stop)
            tasks = ((split, a, b, list(itertools.islice(raw, b - a))) for a, b in chunks)
        else:
            tasks = ((split, a, b, None) for a, b in chunks)
        in_flight = collections.deque()
        for task in itertools.islice(tasks, self.workers * CHUNKS_PER_WORKER):
            in_flight.append(self._pool.submit(_encode_chunk, *task))
        while in_flight:
            done, error = in_flight.popleft().result()
            for task in itertools.islice(tasks, 1):
                in_flight.append(self._pool.submit(_encode_chunk, *task))
            yield from done
            if error is not None:  # an unreadable image: raised here, after the samples before it
                raise error
