"""A loader over uint8 images held in memory, data-parallel and exactly resumable.

Everything a batch depends on is a pure function of (seed, epoch, position), so the loader's whole state is two
integers: the epoch and how many batches of it were handed out. Resuming recomputes the epoch's order and carries on.

Epoch ``e``, for ``world_size`` W and ``batch_size`` B over N samples:

- order: ``torch.randperm(N)`` from a generator seeded by a hash of (seed, e) when shuffling, else ``0..N-1``;
- with ``drop_last`` the order is cut to its first ``(N // (W*B)) * W*B`` entries (the tail of the permutation is
  dropped, a different tail each epoch when shuffling); rank r takes positions r, r+W, r+2W, ... and cuts them
  into batches of B, so every rank has the same number of full batches;
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

from .seeding import derive_seed
from .transforms import to_float


class InMemoryLoader:
    """Yields ``(images float32 (B,C,H,W) in [-1,1], labels int64 (B,))`` for one rank.

    ``repeat=True`` runs through epochs forever (training). ``repeat=False`` yields one epoch per ``for`` loop:
    a loop that was interrupted continues where it stopped, a loop over a finished epoch starts the next epoch.

    ``state_dict()`` counts the batches already handed out in the current epoch; after ``load_state_dict`` the next
    batch is the one an uninterrupted loader would have yielded next. Save the state after consuming the batch
    (a prefetching wrapper must save the count of batches the model actually used, not of batches fetched).
    ``num_workers`` does not apply: batches are slices of an in-memory array.
    """

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
    ) -> None:
        images = np.asarray(images)
        labels = np.asarray(labels)
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {images.shape}")
        if labels.shape != (len(images),):
            raise ValueError(f"labels must have shape ({len(images)},), got {labels.shape}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        self._images = images  # never written to: batches are copies (fancy indexing)
        self._labels = labels.astype(np.int64, copy=False)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.repeat = repeat
        self.drop_last = drop_last
        self.random_flip = random_flip
        self.rank = rank
        self.world_size = world_size

        n = len(images)
        per_step = world_size * batch_size
        usable = (n // per_step) * per_step if drop_last else n
        # Positions (into the epoch's order) that belong to this rank: the same every epoch.
        self._positions = np.arange(rank, usable, world_size, dtype=np.int64)
        self._batches_per_epoch = -(-len(self._positions) // batch_size)
        if repeat and self._batches_per_epoch == 0:
            raise ValueError(
                f"{n} samples give no batch of {batch_size} per rank across {world_size} ranks with drop_last; "
                "an endless loader would never yield"
            )

        self._epoch = 0
        self._batch = 0  # batches of the current epoch already handed out
        self._plan_epoch: int | None = None
        self._plan: tuple[np.ndarray, np.ndarray | None] = (self._positions, None)

    # -- public properties ---------------------------------------------------------------------------------------
    @property
    def batches_per_epoch(self) -> int:
        """Batches this rank yields per epoch."""
        return self._batches_per_epoch

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from (before a pending roll-over at the end of an epoch)."""
        return self._epoch

    @property
    def skipped_corrupt(self) -> int:
        return 0  # arrays in memory are decoded already

    @property
    def num_samples(self) -> int:
        """Size of the whole array (all ranks)."""
        return len(self._images)

    @property
    def samples_per_epoch(self) -> int:
        """Samples this rank yields per epoch."""
        return len(self._positions)

    # -- iteration -----------------------------------------------------------------------------------------------
    def _epoch_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(sample indices of this rank in yield order, flip flags or None) for ``epoch``; cached for one epoch."""
        if self._plan_epoch != epoch:
            n = len(self._images)
            if self.shuffle:
                gen = torch.Generator().manual_seed(derive_seed("order", self.seed, epoch))
                order = torch.randperm(n, generator=gen).numpy()
            else:
                order = np.arange(n, dtype=np.int64)
            flips = None
            if self.random_flip:
                gen = torch.Generator().manual_seed(derive_seed("flip", self.seed, epoch))
                flips = (torch.rand(n, generator=gen) < 0.5).numpy()[self._positions]
            self._plan = (order[self._positions], flips)
            self._plan_epoch = epoch
        return self._plan

    def _make_batch(self, epoch: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        indices, flips = self._epoch_plan(epoch)
        part = slice(index * self.batch_size, (index + 1) * self.batch_size)
        u8 = self._images[indices[part]]  # a fresh copy, safe to flip in place
        if flips is not None:
            f = flips[part]
            u8[f] = u8[f][..., ::-1]
        return to_float(u8), torch.from_numpy(self._labels[indices[part]])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._batch >= self._batches_per_epoch:  # a finished epoch: a new loop starts the next one
            self._epoch, self._batch = self._epoch + 1, 0
        while True:
            if self._batch >= self._batches_per_epoch:
                if not self.repeat:
                    return
                self._epoch, self._batch = self._epoch + 1, 0
            batch = self._make_batch(self._epoch, self._batch)
            self._batch += 1  # counted before the yield: a state saved after using this batch resumes after it
            yield batch

    # -- resumption ----------------------------------------------------------------------------------------------
    def _identity(self) -> dict[str, int]:
        """What must match for a saved position to mean the same samples."""
        return {
            "seed": int(self.seed),
            "num_samples": self.num_samples,
            "shuffle": int(self.shuffle),
            "drop_last": int(self.drop_last),
        }

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches_in_epoch": self._batch, **self._identity(),
                "world_size": self.world_size, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = self._identity()
        missing = [k for k in ("epoch", "batches_in_epoch", "world_size", "batch_size", *expected) if k not in state]
        if missing:
            raise ValueError(f"loader state lacks {missing}")
        differ = [f"{k}: saved {state[k]}, now {v}" for k, v in expected.items() if int(state[k]) != v]
        if differ:
            raise ValueError("loader state is from a different setup (" + "; ".join(differ) + ")")
        epoch, batch = int(state["epoch"]), int(state["batches_in_epoch"])
        # Ranks take interleaved positions of the epoch's order, so after b batches of B on each of W ranks exactly
        # the first b·B·W samples of the epoch are used, whatever W and B were: another number of ranks (or another
        # micro-batch) continues from the same sample.
        consumed = batch * int(state["batch_size"]) * int(state["world_size"])
        per_step = self.batch_size * self.world_size
        if consumed % per_step:
            raise ValueError(f"loader state: {consumed} samples of epoch {epoch} were used, which is not a whole "
                             f"number of steps of {self.batch_size} × {self.world_size} ranks; resume with a "
                             f"micro-batch × ranks that divides it")
        batch = consumed // per_step
        if epoch < 0 or not 0 <= batch <= self._batches_per_epoch:
            raise ValueError(
                f"loader state epoch={epoch} batches_in_epoch={batch} out of range "
                f"(batches_per_epoch={self._batches_per_epoch})"
            )
        self._epoch, self._batch = epoch, batch
