"""The state machine every loader shares: identity, position, epoch roll-over, resumption, worker seeding.

A loader yields the batches of one rank. Its position is two integers, the epoch and how many of the epoch's
batches were handed out; everything a batch depends on is a pure function of the loader's identity and that
position, so a resumed loader recomputes the epoch's plan and carries on with the next batch.

The position is kept in global terms: a state records ``batches_in_epoch`` together with the ``batch_size`` and
``world_size`` that produced it, so ``batches_in_epoch × batch_size × world_size`` is the number of samples of the
epoch that all ranks together have consumed (data-parallel ranks advance in lockstep). A loader whose epoch plan
gives rank r the positions r, r+W, r+2W, … of one global order (``elastic = True``) resumes from that count on any
number of ranks and any micro-batch that divides it; any other loader requires the same ``world_size`` and
``batch_size`` (they become part of its identity).

**Elastic determinism.** Batches are ``Batch(images, labels, indices)``: ``indices`` number the samples of the
split in its natural order, so per-sample randomness keyed by them (the trainer's dequantisation and label drop)
does not depend on the launch. An elastic loader also cuts a training epoch into whole *global batches*
(``global_batch``: the samples of one optimizer step over all ranks and micro-batches), so that step k reads the same
set of samples on any number of ranks, with any micro-batch and any number of workers; a state saved on one number
of ranks resumes on another and continues the same sequence of global batches. Together: the same losses up to
floating-point summation order (and the nondeterminism of the device's kernels, e.g. bf16 or GPU atomics).

A subclass supplies:

- ``_identity()``: what else must match for a saved position to mean the same samples (the base adds ``seed``,
  ``num_samples`` and, unless elastic, ``world_size`` and ``batch_size``);
- ``_epoch_batches()``: the rest of the current epoch from batch ``self._batch`` on, one item per planned batch —
  the ``Batch``, or ``None`` for a planned batch with nothing to yield (all of its samples were corrupt and skipped).
  The base counts every item before handing it out, so a state saved after using a batch resumes after it;
- optionally ``_epoch_started()`` (reset per-epoch counters), ``_extra_state()`` / ``_load_extra_state()`` (more
  resumable detail, e.g. corrupt samples skipped per worker) and ``_refused_hint`` (appended to a refused state).

It calls ``_setup_epochs`` once its plan is known.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader

from .seeding import derive_seed

SPLITS = ("train", "heldout")


def check_split(split: str) -> bool:
    """True for ``train`` (shuffled, endless), False for ``heldout``; a ValueError for anything else."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    return split == "train"


class ResumableLoader:
    """Batches of one rank, endless (``repeat``) or one epoch per ``for`` loop, exactly resumable.

    ``repeat=True`` runs through epochs forever (training). ``repeat=False`` yields one epoch per ``for`` loop: a
    loop that was interrupted continues where it stopped, a loop over a finished epoch starts the next epoch.
    """

    elastic = False           # True: resumes on another number of ranks / micro-batch (see the module docstring)
    _worker_stream = "workers"  # names the seeds of the DataLoader workers
    _refused_hint = ""

    index_ordered = False     # True: each rank yields its samples in increasing index order (evaluation may stop
                              # reading once a batch is past the images it needs)

    def __init__(self, batch_size: int, *, seed: int, rank: int, world_size: int, repeat: bool,
                 num_workers: int = 0, global_batch: int | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        global_batch = batch_size * world_size if global_batch is None else global_batch
        if global_batch < 1 or global_batch % (batch_size * world_size):
            raise ValueError(f"global_batch={global_batch} is not a multiple of batch_size × world_size = "
                             f"{batch_size} × {world_size}")
        self.global_batch = global_batch
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, int(seed), rank, world_size
        self._repeat = repeat
        self._epoch = 0
        self._batch = 0    # batches of the current epoch already handed out
        self._skipped = 0  # corrupt samples left out of the batches handed out so far
        # The plan's sizes, fixed once the subclass calls _setup_epochs:
        self.num_samples = 0        # samples in the split (all ranks): the data set read, whatever ranks and batches
        self.samples_per_epoch = 0  # sample positions this rank reads per epoch (corrupt ones that get skipped too)
        self.batches_per_epoch = 0  # batches this rank yields per epoch (a batch of only corrupt samples: not yielded)

    def _setup_epochs(self, *, num_samples: int, batches_per_epoch: int, samples_per_epoch: int) -> None:
        """The plan's sizes; an endless loader without a batch is refused (it would never yield)."""
        self.num_samples, self.samples_per_epoch = num_samples, samples_per_epoch
        self.batches_per_epoch = batches_per_epoch
        if self._repeat and batches_per_epoch == 0:
            raise ValueError(f"{num_samples} samples give no batch of {self.batch_size} per rank across "
                             f"{self.world_size} ranks; an endless loader would never yield (lower the batch size)")

    # -- public properties ---------------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from (before a pending roll-over at the end of an epoch)."""
        return self._epoch

    @property
    def skipped_corrupt(self) -> int:
        """Corrupt samples left out so far (``data.skip_corrupt``), carried over by ``state_dict``."""
        return self._skipped

    # -- iteration -----------------------------------------------------------------------------------------------
    def _epoch_batches(self) -> Iterator[Any]:
        raise NotImplementedError

    def _epoch_started(self) -> None:
        """Called when a new epoch begins (after the roll-over): reset per-epoch counters here."""

    def _next_epoch(self) -> None:
        self._epoch, self._batch = self._epoch + 1, 0
        self._epoch_started()

    def __iter__(self) -> Iterator[Any]:
        if self._batch >= self.batches_per_epoch:  # a finished epoch: a new loop starts the next one
            self._next_epoch()
        while True:
            if self._batch >= self.batches_per_epoch:
                if not self._repeat:
                    return
                self._next_epoch()
            batches = self._epoch_batches()
            try:
                for batch in batches:
                    self._batch += 1  # counted before the yield: a state saved after using it resumes after it
                    if batch is not None:
                        yield batch
            finally:
                batches.close()  # at once, also when the caller stops early: its workers and threads end here
            if not self._repeat:
                return

    def rewind(self) -> None:
        """Back to the first batch of the current epoch: a held-out pass that stopped early (``max_images``) must not
        make the next evaluation continue with other images."""
        self._batch = 0
        self._epoch_started()

    def _dataloader(self, dataset, *, num_workers: int, batch_size: int | None,
                    collate_fn: Callable | None = None, worker_init_fn: Callable | None = None,
                    persistent_workers: bool = False) -> DataLoader:
        """A DataLoader over one epoch, with its own worker seeds: the default draws them from the global RNG,
        which the trainer's noise comes from, and a resumed run starts its loaders at other points.

        ``persistent_workers``: keep the workers for the next ``iter()`` (later epochs), for a dataset whose
        workers draw no random numbers (their seeds stay those of the epoch that started them) and learn each
        epoch's plan from shared state rather than from their copy of the dataset."""
        return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                          collate_fn=collate_fn, worker_init_fn=worker_init_fn if num_workers else None,
                          persistent_workers=persistent_workers and num_workers > 0, drop_last=False,
                          generator=torch.Generator().manual_seed(derive_seed(self._worker_stream, self.seed,
                                                                              self._epoch)))

    # -- resumption ----------------------------------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        return {}

    def _full_identity(self) -> dict[str, Any]:
        """What must match for a saved position to mean the same samples."""
        identity = {"seed": self.seed, "num_samples": self.num_samples, **self._identity()}
        if not self.elastic:
            identity.update(world_size=self.world_size, batch_size=self.batch_size)
        return identity

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any], epoch: int, batch: int) -> None:
        """Check and take what ``_extra_state`` saved; called before the position is set."""

    def state_dict(self) -> dict[str, Any]:
        """Plain ints and strings (and a dict of them): position, counters and the identity of the setup."""
        return {"epoch": self._epoch, "batches_in_epoch": self._batch, "world_size": self.world_size,
                "batch_size": self.batch_size, "skipped_corrupt": self._skipped, **self._full_identity(),
                **self._extra_state()}

    def _resumed_batch(self, state: dict[str, Any]) -> int:
        """This loader's batch of the saved epoch: the same count, or for an elastic loader the saved global
        number of samples consumed divided by this loader's step (micro-batch × ranks)."""
        batch = int(state["batches_in_epoch"])
        if not self.elastic:
            return batch
        # Ranks take interleaved positions of the epoch's order, so after b batches of B on each of W ranks exactly
        # the first b·B·W samples of the epoch are used, whatever W and B were.
        consumed = batch * int(state["batch_size"]) * int(state["world_size"])
        step = self.batch_size * self.world_size
        if consumed % step:
            raise ValueError(f"loader state: {consumed} samples of epoch {state['epoch']} were used, which is not a "
                             f"whole number of steps of {self.batch_size} × {self.world_size} ranks; resume with a "
                             f"micro-batch × ranks that divides it")
        return consumed // step

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = self._full_identity()
        missing = [k for k in ("epoch", "batches_in_epoch", "world_size", "batch_size", *expected) if k not in state]
        if missing:
            raise ValueError(f"loader state lacks {missing} (not a state of this kind of loader?)")
        differ = [f"{k}: saved {state[k]!r}, now {v!r}" for k, v in expected.items() if str(state[k]) != str(v)]
        if differ:
            raise ValueError("loader state is from a different setup (" + "; ".join(differ) + ")"
                             + self._refused_hint)
        epoch, batch = int(state["epoch"]), self._resumed_batch(state)
        if epoch < 0 or not 0 <= batch <= self.batches_per_epoch:
            raise ValueError(f"loader state epoch={epoch} batches_in_epoch={batch} out of range "
                             f"(batches_per_epoch={self.batches_per_epoch})")
        self._load_extra_state(state, epoch, batch)
        self._epoch, self._batch = epoch, batch
        self._skipped = int(state.get("skipped_corrupt", 0))
