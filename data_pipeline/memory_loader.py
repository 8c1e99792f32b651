"""A loader over uint8 images held in memory, data-parallel and exactly resumable.

Everything a batch depends on is a pure function of (seed, epoch, position), so the loader's whole state is two
integers: the epoch and how many batches of it were handed out. Resuming recomputes the epoch's order and carries on.

Epoch ``e``, for ``world_size`` W and ``batch_size`` B over N samples:

- order: ``torch.randperm(N)`` from a generator seeded by a hash of (seed, e) when shuffling, else ``0..N-1``;
- with ``drop_last`` the order is cut to its first ``(N // G) * G`` entries, G the global batch (``W*B`` times
  the micro-batches of a step; the tail of the permutation is dropped, a different tail each epoch when shuffling);
  rank r takes positions r, r+W, r+2W, ... and cuts them into batches of B, so every rank has the same number of
  full batches, and the A micro-batches of step k on all ranks together are positions kG .. (k+1)G-1 whatever W,
  B and A (``resumable``: elastic);
- without ``drop_last`` (evaluation) nothing is dropped: rank r takes positions r, r+W, ... of all N, so the ranks
  together yield every sample exactly once; a rank's last batch may be smaller, and when N is not a multiple of W
  the higher ranks hold one sample fewer, which can mean one batch fewer;
- flips (``random_flip``): one uniform number per position of the epoch's order, from a generator seeded by a
  hash of (seed, e); position p is flipped when its number is < 0.5. This depends neither on rank nor on
  world_size nor on where a run was interrupted.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch

from .batch import Batch
from .resumable import ResumableLoader
from .seeding import derive_seed
from .transforms import to_float


class InMemoryLoader(ResumableLoader):
    """Yields ``Batch(images float32 (B,C,H,W) in [-1,1], labels int64 (B,), indices int64 (B,))`` for one rank;
    the indices are rows of ``images``.

    ``repeat=True`` runs through epochs forever (training). ``repeat=False`` yields one epoch per ``for`` loop:
    a loop that was interrupted continues where it stopped, a loop over a finished epoch starts the next epoch.

    ``state_dict()`` counts the batches already handed out in the current epoch; after ``load_state_dict`` the next
    batch is the one an uninterrupted loader would have yielded next, also on another number of ranks or with
    another micro-batch (``elastic``: see ``resumable``). Save the state after consuming the batch (a prefetching
    wrapper must save the count of batches the model actually used, not of batches fetched). ``num_workers`` does
    not apply: batches are slices of an in-memory array.
    """

    elastic = True

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        batch_size: int,
        *,
        seed: int,
        shuffle: bool,
        repeat: bool,
        drop_last: bool,
        random_flip: bool = False,
        rank: int = 0,
        world_size: int = 1,
        global_batch: int | None = None,
    ) -> None:
        images = np.asarray(images)
        labels = np.asarray(labels)
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {images.shape}")
        if labels.shape != (len(images),):
            raise ValueError(f"labels must have shape ({len(images)},), got {labels.shape}")
        super().__init__(batch_size, seed=seed, rank=rank, world_size=world_size, repeat=repeat,
                         global_batch=global_batch)
        self.index_ordered = not shuffle
        self._images = images  # never written to: batches are copies (fancy indexing)
        self._labels = labels.astype(np.int64, copy=False)
        self._shuffle, self._drop_last, self._random_flip = shuffle, drop_last, random_flip

        n = len(images)
        usable = (n // self.global_batch) * self.global_batch if drop_last else n
        # Positions (into the epoch's order) that belong to this rank: the same every epoch.
        self._positions = np.arange(rank, usable, world_size, dtype=np.int64)
        self._setup_epochs(num_samples=n, batches_per_epoch=-(-len(self._positions) // batch_size),
                           samples_per_epoch=len(self._positions))
        self._plan_epoch: int | None = None
        self._plan: tuple[np.ndarray, np.ndarray | None] = (self._positions, None)

    # -- the epoch plan ------------------------------------------------------------------------------------------
    def _epoch_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(sample indices of this rank in yield order, flip flags or None) for ``epoch``; cached for one epoch."""
        if self._plan_epoch != epoch:
            n = len(self._images)
            if self._shuffle:
                gen = torch.Generator().manual_seed(derive_seed("order", self.seed, epoch))
                order = torch.randperm(n, generator=gen).numpy()
            else:
                order = np.arange(n, dtype=np.int64)
            flips = None
            if self._random_flip:
                gen = torch.Generator().manual_seed(derive_seed("flip", self.seed, epoch))
                flips = (torch.rand(n, generator=gen) < 0.5).numpy()[self._positions]
            self._plan = (order[self._positions], flips)
            self._plan_epoch = epoch
        return self._plan

    def _make_batch(self, epoch: int, index: int) -> Batch:
        indices, flips = self._epoch_plan(epoch)
        part = slice(index * self.batch_size, (index + 1) * self.batch_size)
        u8 = self._images[indices[part]]  # a fresh copy, safe to flip in place
        if flips is not None:
            f = flips[part]
            u8[f] = u8[f][..., ::-1]
        rows = indices[part]
        return Batch(to_float(u8), torch.from_numpy(self._labels[rows]), torch.from_numpy(rows.astype(np.int64)))

    def _epoch_batches(self) -> Iterator[Batch]:
        for index in range(self._batch, self.batches_per_epoch):
            yield self._make_batch(self._epoch, index)

    def _identity(self) -> dict[str, Any]:
        return {"shuffle": int(self._shuffle), "drop_last": int(self._drop_last)}
