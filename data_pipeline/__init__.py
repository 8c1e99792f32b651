"""The data path: from the ``data`` config and this process's rank to batches that resume exactly.

Imports nothing from models/, trainer/ or cluster/. A format (how samples are stored) is one entry of
``FORMATS``: adding webdataset or MDS is a new module and one line there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

from .batch import Batch
from .config import DataConfig
from .embedded import EmbeddedImages, load_embedded, split_heldout
from .manifest import read_manifest
from .mds_loader import MDSLoader
from .memory_loader import InMemoryLoader
from .resumable import SPLITS, ResumableLoader, check_split
from .transforms import ImageTransform
from .webdataset_loader import WebDatasetLoader


class Loader(Protocol):
    """What the trainer may rely on, whatever the format (every loader here is a ``ResumableLoader``)."""

    @property
    def batches_per_epoch(self) -> int: ...
    @property
    def epoch(self) -> int: ...
    @property
    def skipped_corrupt(self) -> int: ...  # samples skipped as undecodable (data.skip_corrupt)
    @property
    def index_ordered(self) -> bool: ...  # heldout: each rank's indices only increase (evaluation may stop early)
    def __iter__(self) -> Iterator[Batch]: ...
    def rewind(self) -> None: ...  # back to the start of the current epoch (evaluation reads the same images)
    def state_dict(self) -> dict[str, int]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class DataFormat:
    """One storage format: how to build a loader, and what its images look like without loading batches."""

    build: Callable[..., Loader]  # (cfg, split, batch_size, *, seed, rank, world_size, global_batch) -> Loader
    info: Callable[[DataConfig], tuple[tuple[int, int, int], int]]  # cfg -> ((C, H, W), num_classes)


def _build_embedded(
    cfg: DataConfig, split: str, batch_size: int, *, seed: int, rank: int, world_size: int,
    global_batch: int | None = None,
) -> InMemoryLoader:
    data = load_embedded(cfg.source)
    # The split uses cfg.split_seed, never the training seed: bits/dim stay comparable across runs.
    train_idx, heldout_idx = split_heldout(len(data.images), cfg.heldout_fraction, cfg.split_seed)
    train = split == "train"
    idx = train_idx if train else heldout_idx
    return InMemoryLoader(
        data.images[idx], data.labels[idx], batch_size,
        seed=seed, shuffle=train, repeat=train, drop_last=train, random_flip=train and cfg.random_flip,
        rank=rank, world_size=world_size, global_batch=global_batch,
    )


def _embedded_info(cfg: DataConfig) -> tuple[tuple[int, int, int], int]:
    data = load_embedded(cfg.source)
    c, h, w = data.images.shape[1:]
    return (c, h, w), data.num_classes


def _sharded_info(cfg: DataConfig) -> tuple[tuple[int, int, int], int]:
    """From the train split's manifest, without reading a shard."""
    manifest = read_manifest(cfg.uri, "train", cfg.format)
    transform = ImageTransform(resize=cfg.resize, crop=cfg.crop)
    return transform.output_shape(tuple(manifest.image_shape)), manifest.num_classes


FORMATS: dict[str, DataFormat] = {
    "embedded": DataFormat(build=_build_embedded, info=_embedded_info),
    "webdataset": DataFormat(build=WebDatasetLoader, info=_sharded_info),
    "mds": DataFormat(build=MDSLoader, info=_sharded_info),
}


def _format(cfg: DataConfig) -> DataFormat:
    if cfg.format not in FORMATS:
        raise ValueError(f"data.format={cfg.format!r} is not supported yet; choose one of {list(FORMATS)}")
    return FORMATS[cfg.format]


def build_loader(
    cfg: DataConfig, split: str, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1,
    global_batch: int | None = None,
) -> Loader:
    """``train``: shuffled, endless, drop_last, flips per cfg. ``heldout``: natural order, one epoch, all samples.

    ``global_batch`` (train): the samples of one optimizer step over all ranks, micro-batches included (``None``:
    ``batch_size × world_size``). An epoch is cut into whole global batches, so that every step's samples are the
    same whatever the ranks, workers and micro-batch (``resumable``)."""
    check_split(split)
    if global_batch is not None and (global_batch < 1 or global_batch % (batch_size * world_size)):
        raise ValueError(f"global_batch={global_batch} is not a multiple of batch_size × world_size = "
                         f"{batch_size} × {world_size}")
    return _format(cfg).build(cfg, split, batch_size, seed=seed, rank=rank, world_size=world_size,
                              global_batch=global_batch)


def dataset_info(cfg: DataConfig) -> tuple[tuple[int, int, int], int]:
    """((C, H, W), num_classes) of the configured data set."""
    return _format(cfg).info(cfg)


__all__ = [
    "Batch", "DataConfig", "DataFormat", "EmbeddedImages", "FORMATS", "InMemoryLoader", "Loader", "ResumableLoader",
    "SPLITS", "build_loader", "dataset_info", "load_embedded", "split_heldout",
]
