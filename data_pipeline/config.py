"""Configuration of the data path (the ``data`` section of a training config)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataConfig:
    """Where images come from and how they are batched.

    ``format`` chooses the loader: ``embedded`` reads a data set that installs with the package (``source`` names
    it: ``digits`` or ``photos``). Later loaders (webdataset, mds) read shards from ``uri``.
    """

    format: str = "embedded"
    source: str = "digits"
    uri: str = ""
    heldout_fraction: float = 0.1  # fixed held-out split of an embedded set, for bits/dim
    split_seed: int = 0            # the split never changes with the training seed
    random_flip: bool = False      # horizontal flip (digits are not flip-invariant)
    num_workers: int = 0
