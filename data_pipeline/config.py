"""Configuration of the data path (the ``data`` section of a training config)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataConfig:
    """Where images come from and how they are batched.

    ``format`` chooses the loader: ``embedded`` reads a data set that installs with the package (``source`` names
    it: ``digits`` or ``photos``); ``webdataset`` and ``mds`` read the shards that ``tarflow data write`` put under
    ``uri`` (a directory or ``s3://bucket/prefix``, holding ``train/`` and ``heldout/`` splits). S3 endpoint and
    credentials come from the standard AWS environment and config chain, never from here.
    """

    format: str = "embedded"
    source: str = "digits"
    uri: str = ""
    heldout_fraction: float = 0.1  # fixed held-out split of an embedded set, for bits/dim
    split_seed: int = 0            # the split never changes with the training seed
    random_flip: bool = False      # horizontal flip (digits are not flip-invariant)
    resize: int = 0                # shorter side to this many pixels (0: as stored)
    crop: int = 0                  # centre crop to this size (0: none)
    num_workers: int = 0           # loader worker processes per rank
    shuffle_buffer: int = 1000     # webdataset: samples in the shuffle buffer (after shard shuffling)
    cache_dir: str = ""            # mds: local cache of downloaded shards ("" : a temporary directory)
    num_canonical_nodes: int = 1   # mds: streaming's shuffle/partition unit, fixed for the run (0 also means 1)
    skip_corrupt: bool = False     # skip (and count) undecodable samples instead of failing
    # webdataset training: the sample sequence is read as this many streams, each through its own shuffle buffer;
    # a global batch takes the same number of samples from each, so it must divide the global batch and be a
    # multiple of the number of ranks. It fixes the order of samples: keep it for a run (0: the largest divisor of
    # the global batch that is at most a quarter of the number of shards and at most 64)
    streams: int = 0
    verify: str = "size"           # shards vs manifest before reading: "size" (present, same size), "sha256", "none"
