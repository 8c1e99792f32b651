"""Writing a source as shards: webdataset tar files or MDS (``streaming.MDSWriter``), plus a manifest per split.

Layout under OUT (a directory or ``s3://bucket/prefix``)::

    OUT/train/shard-000000.tar …  OUT/train/manifest.json        (webdataset)
    OUT/train/shard.00000.mds …   OUT/train/index.json  OUT/train/manifest.json   (mds)
    OUT/heldout/…

Shards are written locally (a temporary directory for S3) and uploaded; the manifest goes last, so a reader that
finds a manifest finds every shard it lists.
"""

from __future__ import annotations

import io
import tarfile
import tempfile
from pathlib import Path

from .codecs import ENCODINGS, EXTENSIONS, LABEL_EXTENSION, encode_image, encode_label
from .manifest import MANIFEST_NAME, Manifest, ShardInfo, sha256_file
from .sources import Source
from .storage import is_s3, join, upload_file

FORMATS = ("webdataset", "mds")


def write_dataset(source: Source, out: str, fmt: str, *, shard_size: int = 64 << 20,
                  encoding: str = "png") -> dict[str, Manifest]:
    if fmt not in FORMATS:
        raise ValueError(f"unknown --format {fmt!r}; choose one of {FORMATS}")
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown --encoding {encoding!r}; choose one of {ENCODINGS}")
    if shard_size < 1024:
        raise ValueError(f"--shard-size must be at least 1024 bytes, got {shard_size}")
    manifests = {}
    for split, samples in source.splits.items():
        with tempfile.TemporaryDirectory(prefix="tarflow-shards-") as staging:
            local = Path(staging) if is_s3(out) else Path(out) / split
            local.mkdir(parents=True, exist_ok=True)
            write = _write_webdataset if fmt == "webdataset" else _write_mds
            shards = write(samples(), local, shard_size, encoding)
            manifest = Manifest(format=fmt, split=split, num_samples=sum(s.num_samples for s in shards),
                                num_classes=source.num_classes, image_shape=list(source.image_shape),
                                encoding=encoding, source=source.name, shards=shards)
            (local / MANIFEST_NAME).write_text(manifest.to_json())
            if is_s3(out):
                names = [s.name for s in shards] + (["index.json"] if fmt == "mds" else [])
                for name in names + [MANIFEST_NAME]:  # manifest last
                    upload_file(local / name, join(out, split, name))
        manifests[split] = manifest
    return manifests


def _write_webdataset(samples, directory: Path, shard_size: int, encoding: str) -> list[ShardInfo]:
    """Plain tar files (``tar tf`` lists ``KEY.png``/``KEY.cls`` pairs), a new shard once ``shard_size`` is reached."""
    shards: list[ShardInfo] = []
    tar, count, size, path = None, 0, 0, None

    def close():
        if tar is not None:
            tar.close()
            shards.append(ShardInfo(path.name, count, path.stat().st_size, sha256_file(path)))

    for key, image, label in samples:
        members = [(f"{key}.{EXTENSIONS[encoding]}", encode_image(image, encoding)),
                   (f"{key}.{LABEL_EXTENSION}", encode_label(label))]
        sample_bytes = sum(len(data) + 1024 for _, data in members)  # tar headers and padding
        if tar is None or (count and size + sample_bytes > shard_size):
            close()
            path = directory / f"shard-{len(shards):06d}.tar"
            tar, count, size = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT), 0, 0
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o444  # reproducible bytes
            tar.addfile(info, io.BytesIO(data))
        count += 1
        size += sample_bytes
    close()
    return shards


def _write_mds(samples, directory: Path, shard_size: int, encoding: str) -> list[ShardInfo]:
    import json

    from streaming import MDSWriter

    columns = {"key": "str", "image": "bytes", "label": "int"}
    with MDSWriter(out=str(directory), columns=columns, size_limit=shard_size, hashes=["sha1"]) as writer:
        for key, image, label in samples:
            writer.write({"key": key, "image": encode_image(image, encoding), "label": int(label)})
    index = json.loads((directory / "index.json").read_text())
    return [ShardInfo(s["raw_data"]["basename"], s["samples"], s["raw_data"]["bytes"],
                      sha256_file(directory / s["raw_data"]["basename"])) for s in index["shards"]]
