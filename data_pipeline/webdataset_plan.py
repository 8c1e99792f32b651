"""The plan of a webdataset epoch: the shard order, which positions of the epoch's sample sequence each training
stream or held-out reader reads, and which rank and worker reads them (described in ``webdataset_loader``'s
docstring)."""

from __future__ import annotations

import random

from .seeding import derive_seed

MAX_DEFAULT_STREAMS = 64  # more streams than this gain no mixing but cost a shuffle buffer and an open shard each
# A stream that starts inside a shard reads that shard's earlier samples and drops them: about half a shard per
# stream and epoch. At 4 shards a stream or more that is at most 1/8 of the reading (measured: 64 streams over 65
# shards read 1.42 samples per sample delivered).
SHARDS_PER_DEFAULT_STREAM = 4


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def share(batches: int, w: int, slots: int) -> int:
    """Of a rank's first ``batches`` batches, how many come from worker ``w`` (batch j is worker j mod slots)."""
    return _ceil_div(batches - w, slots) if batches > w else 0


def shard_order(num_shards: int, *, train: bool, seed: int, epoch: int) -> list[int]:
    """``train``: a permutation seeded by (seed, epoch); ``heldout``: manifest order."""
    order = list(range(num_shards))
    if train:
        random.Random(derive_seed("shards", seed, epoch)).shuffle(order)
    return order


def segments(counts: list[int], order: list[int], start: int, stop: int) -> list[tuple[int, int, int]]:
    """(shard index, first sample, end sample) in reading order for the positions [start, stop) of the sequence
    that concatenates the shards' samples in ``order``."""
    out, offset = [], 0
    for shard in order:
        n = counts[shard]
        lo, hi = max(start, offset), min(stop, offset + n)
        if lo < hi:
            out.append((shard, lo - offset, hi - offset))
        offset += n
        if offset >= stop:
            break
    return out


def default_streams(global_batch: int, num_shards: int) -> int:
    """``data.streams=0``: the largest divisor of the global batch that is at most a quarter of the number of
    shards (at least 1) and at most ``MAX_DEFAULT_STREAMS`` — a function of the run's global batch and data set
    only, never of its ranks."""
    cap = min(max(1, num_shards // SHARDS_PER_DEFAULT_STREAM), MAX_DEFAULT_STREAMS, global_batch)
    return max(d for d in range(1, cap + 1) if global_batch % d == 0)


def _suggest(global_batch: int, world_size: int, num_shards: int) -> str:
    """A value of data.streams that fits: the largest within the default's bounds, else the smallest that fits."""
    fits = [d for d in range(world_size, min(global_batch, num_shards) + 1, world_size) if global_batch % d == 0]
    if not fits:
        return "none fits these shards: write more, smaller shards"
    cap = min(max(1, num_shards // SHARDS_PER_DEFAULT_STREAM), MAX_DEFAULT_STREAMS)
    within = [d for d in fits if d <= cap]
    return f"e.g. data.streams={within[-1] if within else fits[0]}"


class StreamPlan:
    """``train``: S streams, each a contiguous run of the epoch's sequence; the global batch of step k takes
    ``chunk`` = G/S consecutive (shuffled) samples of every stream; rank r of W owns streams [r·S/W, (r+1)·S/W)."""

    def __init__(self, counts: list[int], *, seed: int, streams: int, global_batch: int, batch_size: int,
                 world_size: int) -> None:
        self.counts, self.seed = list(counts), seed
        g, w_, b, n_shards = global_batch, world_size, batch_size, len(counts)
        if g % (b * w_):
            raise ValueError(f"global batch {g} is not a whole number of micro-batches of {b} on {w_} rank(s); "
                             f"make the global batch a multiple of micro-batch × ranks = {b * w_}")
        s = streams or default_streams(g, n_shards)
        how = f"data.streams={streams}" if streams else f"data.streams=0 (the default: {s} streams)"
        if s > n_shards:
            raise ValueError(f"{how} exceeds the {n_shards} train shard(s): every stream needs a shard of its own; "
                             f"lower data.streams ({_suggest(g, w_, n_shards)}) or write more, smaller shards "
                             f"(`tarflow data write --shard-size`)")
        if g % s:
            raise ValueError(f"{how} does not divide the global batch {g}: every step takes the same number of "
                             f"samples from each stream; set data.streams to a divisor of {g} "
                             f"({_suggest(g, w_, n_shards)})")
        if s % w_:
            raise ValueError(f"{how} cannot be split evenly over {w_} ranks (global batch {g}); set data.streams to "
                             f"a multiple of {w_} that divides {g} ({_suggest(g, w_, n_shards)}) and keep it for "
                             f"the whole run: it fixes the order of the samples")
        n = sum(counts)
        self.streams, self.global_batch, self.batch_size, self.world_size = s, g, b, w_
        self.chunk = g // s                                  # samples of one stream in one global batch
        self.runs = [(i * n // s, (i + 1) * n // s) for i in range(s)]
        self.steps = min(hi - lo for lo, hi in self.runs) // self.chunk  # global batches per epoch
        self.micro_batches = g // (b * w_)                   # micro-batches of one rank in one step
        self.streams_per_rank = s // w_

    def rank_streams(self, rank: int) -> list[int]:
        return list(range(rank * self.streams_per_rank, (rank + 1) * self.streams_per_rank))

    def worker_streams(self, rank: int, worker: int, workers: int) -> list[int]:
        """A rank's streams split into ``workers`` contiguous blocks (sizes differ by at most one): the workers'
        chunks, concatenated in worker order, are in stream order."""
        mine = self.rank_streams(rank)
        return mine[worker * len(mine) // workers:(worker + 1) * len(mine) // workers]

    def segments(self, epoch: int, stream: int) -> list[tuple[int, int, int]]:
        order = shard_order(len(self.counts), train=True, seed=self.seed, epoch=epoch)
        return segments(self.counts, order, *self.runs[stream])


class HeldoutPlan:
    """``heldout``: rank r reads positions [r·N/R, (r+1)·N/R) in manifest order, in batches dealt round-robin over
    its W reader slots; worker w reads one contiguous run of them."""

    def __init__(self, counts: list[int], *, batch_size: int, world_size: int, slots: int) -> None:
        self.counts, self.batch_size, self.world_size, self.slots = list(counts), batch_size, world_size, slots
        n, b = sum(counts), batch_size
        self.rank_batches: list[int] = []
        self.worker_batches: list[list[int]] = []
        self.ranges: list[list[tuple[int, int]]] = []
        for r in range(world_size):
            start, stop = r * n // world_size, (r + 1) * n // world_size
            k = _ceil_div(stop - start, b)
            per_worker = [share(k, w, slots) for w in range(slots)]
            runs, pos = [], start
            for w in range(slots):
                end = min(stop, pos + per_worker[w] * b)
                runs.append((pos, end))
                pos = end
            self.rank_batches.append(k)
            self.worker_batches.append(per_worker)
            self.ranges.append(runs)

    def segments(self, rank: int, worker: int) -> list[tuple[int, int, int]]:
        return segments(self.counts, list(range(len(self.counts))), *self.ranges[rank][worker])
