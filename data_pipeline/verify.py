"""``data.verify``: are the shards a manifest lists the shards on disk? Checked before the first step, so that a
missing or shortened shard fails at loader construction rather than when a reader reaches it, steps later.

- ``size`` (the default): every listed shard is present with the manifest's size — one directory listing or one
  S3 ``ListObjectsV2`` (paginated) per split, no shard is opened;
- ``sha256``: the same, and each shard's digest is compared with the manifest's when it is read (the loader does
  that as it reads, see ``webdataset_reader``; MDS hashes every shard up front);
- ``none``: neither (a shard that is gone still fails when it is read).
"""

from __future__ import annotations

import hashlib

from .manifest import MANIFEST_NAME, Manifest
from .storage import DataSourceError, join, list_sizes, open_stream

VERIFY_MODES = ("size", "sha256", "none")
_FIX = "rewrite the split with `tarflow data write` (or restore the shard)"


def check_verify_mode(mode: str) -> None:
    if mode not in VERIFY_MODES:
        raise ValueError(f"data.verify={mode!r} is not one of {list(VERIFY_MODES)}: 'size' checks every shard is "
                         f"present with the manifest's size, 'sha256' also compares digests, 'none' checks nothing")


def check_shard_sizes(split_uri: str, manifest: Manifest, mode: str) -> None:
    """Every shard the manifest lists is under ``split_uri`` with the manifest's size (unless ``mode`` is none);
    a DataSourceError naming the first shard that is not, the expected and actual size and the fix."""
    check_verify_mode(mode)
    if mode == "none":
        return
    where = join(split_uri, MANIFEST_NAME)
    present = list_sizes(split_uri)
    missing = [s for s in manifest.shards if s.name not in present]
    if missing:
        more = f", and {len(missing) - 1} more shard(s) are missing" if len(missing) > 1 else ""
        first = missing[0]
        raise DataSourceError(f"shard missing: {join(split_uri, first.name)} ({where} lists it with {first.bytes} "
                              f"bytes{more}); {_FIX}")
    wrong = [s for s in manifest.shards if present[s.name] != s.bytes]
    if wrong:
        more = f"; {len(wrong) - 1} more shard(s) differ in size" if len(wrong) > 1 else ""
        first = wrong[0]
        raise DataSourceError(f"shard {join(split_uri, first.name)} has {present[first.name]} bytes but {where} "
                              f"lists {first.bytes} (truncated or replaced since the manifest was written{more}); "
                              f"{_FIX}")


def digest_mismatch(shard_uri: str, actual: str, expected: str, manifest_uri: str) -> DataSourceError:
    return DataSourceError(f"shard {shard_uri} has sha256 {actual} but {manifest_uri} lists {expected} (changed "
                           f"since the manifest was written); {_FIX}")


def check_shard_digests(split_uri: str, manifest: Manifest) -> None:
    """``sha256`` up front: read every shard once and compare its digest with the manifest's (for readers that
    cannot hash as they read, such as MDS's streaming)."""
    where = join(split_uri, MANIFEST_NAME)
    for shard in manifest.shards:
        uri = join(split_uri, shard.name)
        digest = hashlib.sha256()
        stream = open_stream(uri)
        try:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                digest.update(chunk)
        finally:
            stream.close()
        if digest.hexdigest() != shard.sha256:
            raise digest_mismatch(uri, digest.hexdigest(), shard.sha256, where)
