"""The manifest written beside every split of a sharded dataset: what a reader checks before it trusts the shards."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1


class ManifestError(ValueError):
    pass


@dataclass
class ShardInfo:
    name: str         # file name relative to the split's directory/prefix
    num_samples: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    format: str                      # "webdataset" | "mds"
    split: str                       # "train" | "heldout"
    num_samples: int
    num_classes: int
    image_shape: list[int]           # [C, H, W] of every stored image
    encoding: str                    # "png" | "jpeg" | "raw"
    source: str
    shards: list[ShardInfo] = field(default_factory=list)
    version: int = MANIFEST_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> "Manifest":
        try:
            data: dict[str, Any] = json.loads(text)
            shards = [ShardInfo(**s) for s in data.pop("shards")]
            manifest = cls(**data, shards=shards)
        except (ValueError, TypeError, KeyError) as e:
            raise ManifestError(f"{where} is not a valid dataset manifest ({e})") from None
        if manifest.version != MANIFEST_VERSION:
            raise ManifestError(f"{where} has manifest version {manifest.version}; this reader knows "
                                f"{MANIFEST_VERSION}")
        if sum(s.num_samples for s in manifest.shards) != manifest.num_samples:
            raise ManifestError(f"{where}: the shards' sample counts do not add up to num_samples="
                                f"{manifest.num_samples}")
        return manifest


def read_manifest(uri: str, split: str, fmt: str) -> Manifest:
    """``uri/split/manifest.json``, checked to describe ``fmt`` shards of images a model can take."""
    from .codecs import ENCODINGS
    from .storage import DataSourceError, join, read_text

    if not uri:
        raise ValueError(f"data.uri is empty: point it at the directory or s3://bucket/prefix that "
                         f"`tarflow data write --format {fmt}` wrote")
    where = join(uri, split, MANIFEST_NAME)
    try:
        text = read_text(where)
    except DataSourceError as e:
        raise DataSourceError(f"cannot read the dataset manifest {where}: {e}") from None
    manifest = Manifest.from_json(text, where)
    if manifest.format != fmt:
        raise ValueError(f"{where} describes a {manifest.format!r} dataset, not {fmt}; set "
                         f"data.format={manifest.format}")
    if manifest.encoding not in ENCODINGS:
        raise ValueError(f"{where}: unknown encoding {manifest.encoding!r}")
    if len(manifest.image_shape) != 3 or manifest.image_shape[0] not in (1, 3):
        raise ValueError(f"{where}: image_shape must be [C, H, W] with C = 1 or 3, got {manifest.image_shape}")
    if not manifest.shards:
        raise ValueError(f"{where} lists no shards")
    return manifest


def sha256_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
