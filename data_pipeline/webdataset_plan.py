"""The plan of a webdataset epoch: which reader (rank, worker) reads which positions of the epoch's sample
sequence, and in which shard order (described in ``webdataset_loader``'s docstring)."""

from __future__ import annotations

import random

from .seeding import derive_seed


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def share(batches: int, w: int, slots: int) -> int:
    """Of a rank's first ``batches`` batches, how many come from worker ``w`` (batch j is worker j mod slots)."""
    return _ceil_div(batches - w, slots) if batches > w else 0


class EpochPlan:
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
            per_worker = [share(k, w, w_) for w in range(w_)]
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
                per_worker = [share(k, w, w_) for w in range(w_)]
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

