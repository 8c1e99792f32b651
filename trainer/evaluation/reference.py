"""FID reference statistics of a data set (``tarflow eval stats DATA_URI --out FILE``).

Default split ``train``, the usual FID reference (the training images): one epoch of the train loader with flips
off, sharded over ranks; its ``drop_last`` leaves out fewer than ranks × batch-size images (the count ``n`` is
stored), so with several ranks the set can differ by those few images. ``--split heldout`` reads every held-out
image exactly once on any number of ranks. Images are what the loader yields (``data.resize`` / ``data.crop``
apply): compute them at the resolution the model generates. Each image goes to the network of the convention as
the loader yields it (float, in [-1, 1]): the convention quantises it (``inception``), as it does the samples.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict

import torch

from .fid import FeatureAccumulator, FeatureStats
from .inception import FIDNetwork
from .progress import progress_bar


def data_config_for(data_uri: str, overrides: list[str]):
    """A DataConfig from ``DATA_URI`` — ``digits`` / ``photos`` (or ``embedded:NAME``): an embedded set; a directory
    or ``s3://bucket/prefix``: shards written by ``tarflow data write`` (format from its manifest) — then
    ``data.*`` overrides."""
    from data_pipeline.manifest import MANIFEST_NAME
    from data_pipeline.storage import DataSourceError, join, read_text

    from ..config import ConfigError, load_config

    bad = [o for o in overrides if not o.startswith("data.")]
    if bad:
        raise ConfigError(f"eval stats takes data.* overrides only, got {bad[0]!r}")
    if data_uri.startswith("embedded:") or data_uri in ("digits", "photos"):
        base = ["data.format=embedded", f"data.source={data_uri.removeprefix('embedded:')}"]
    else:
        base = [f"data.uri={data_uri}"]
        if not any(o.startswith("data.format=") for o in overrides):
            where = join(data_uri, "train", MANIFEST_NAME)
            try:
                fmt = json.loads(read_text(where))["format"]
            except (DataSourceError, ValueError, KeyError) as e:
                raise DataSourceError(f"{data_uri} is neither an embedded set (digits, photos) nor a dataset "
                                      f"written by `tarflow data write` (reading {where}: {e})") from None
            base.append(f"data.format={fmt}")
    cfg = load_config(None, [*base, *overrides, "data.random_flip=false"])
    return cfg.data


def compute_reference_stats(data_cfg, split: str, inception: FIDNetwork, *, batch_size: int,
                            device: torch.device, rank: int = 0, world_size: int = 1,
                            max_images: int = 0) -> FeatureStats:
    """Collective: every rank reads its share of ``split`` (see the module doc); statistics on every rank."""
    from data_pipeline import build_loader, dataset_info

    if split not in ("train", "heldout"):
        raise ValueError(f"--split must be train or heldout, got {split!r}")
    image_shape, _ = dataset_info(data_cfg)
    loader = build_loader(data_cfg, split, batch_size, seed=0, rank=rank, world_size=world_size)
    train = split == "train"
    batches = loader.batches_per_epoch if train else None  # the train loader never ends by itself
    # train: each rank its first share of the epoch's shuffled order (its ranks interleave one global order);
    # heldout: the images of index < max_images, the same set on any number of ranks
    limit = -(-max_images // world_size) if max_images and train else 0
    acc = FeatureAccumulator(inception.feature_dim, device)
    seen = 0
    with progress_bar(_expected_images(loader, split, batch_size, world_size, max_images),
                      f"statistics of {split}", rank=rank) as bar:
        for i, (x, _, indices) in enumerate(loader):
            if batches is not None and i >= batches:
                break
            if limit and seen >= limit:
                break
            if limit:
                x = x[: limit - seen]
            elif max_images:
                keep = indices < max_images
                if not bool(keep.any()):
                    if loader.index_ordered:
                        break
                    continue
                x = x[keep]
            acc.update(inception.features(x))
            seen += x.shape[0]
            bar.update(x.shape[0] * world_size)
    acc.all_reduce()
    dataset = {k: v for k, v in asdict(data_cfg).items()
               if k in ("format", "source", "uri", "heldout_fraction", "split_seed", "resize", "crop")}
    if data_cfg.format == "embedded":
        dataset.pop("uri")
    else:
        dataset.pop("source")
    meta = {"dataset": dataset, "split": split, "image_shape": list(image_shape), "num_images": acc.n,
            "max_images": max_images, "ranks": world_size, "loader_batch_size": batch_size,
            "convention": inception.convention, "network": inception.identity, "feature_dim": inception.feature_dim,
            "features": "pool3", "preprocessing": inception.preprocessing,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if split == "train":
        meta["note"] = ("one epoch of the train loader (no flips); its drop_last leaves out fewer than "
                        "ranks x loader_batch_size images")
    return FeatureStats.from_accumulator(acc, meta)


def _expected_images(loader, split: str, batch_size: int, world_size: int, max_images: int) -> int:
    """About how many images the pass reads over all ranks (for the progress bar; the count stored is exact)."""
    if split == "train":
        epoch = loader.batches_per_epoch * batch_size * world_size
        return min(epoch, max_images) if max_images else epoch
    return min(loader.num_samples, max_images) if max_images else loader.num_samples


def stats_file_name(data_cfg, image_shape, convention: str) -> str:
    """The official code's file name for these statistics, ``{dataset}_{size}_fid_stats.pth``: the embedded set's
    name, or the last part of the data URI, and the image size."""
    from .fid import official_stats_name

    name = data_cfg.source if data_cfg.format == "embedded" else data_cfg.uri.rstrip("/").rsplit("/", 1)[-1]
    return official_stats_name(name, int(image_shape[-1]), convention)
