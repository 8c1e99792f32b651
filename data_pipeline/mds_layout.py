"""The layout of an MDS split (``manifest.json``, streaming's ``index.json``, ``shard.NNNNN.mds``) on a local path or
``s3://``, checked before streaming reads it, so that a missing file or an unreachable endpoint fails at
construction with ``DataSourceError`` (or a ``ValueError`` naming the file), not as a hang or a short epoch."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

from .manifest import MANIFEST_NAME, Manifest, read_manifest
from .storage import DataSourceError, is_s3, join, list_sizes, read_text
from .verify import check_shard_digests, check_shard_sizes, check_verify_mode

INDEX_NAME = "index.json"
COLUMNS = {"key": "str", "image": "bytes", "label": "int"}


def check_s3_endpoints(uri: str) -> None:
    if not is_s3(uri):
        return
    ours = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    theirs = os.environ.get("S3_ENDPOINT_URL")
    if theirs and ours and theirs.rstrip("/") != ours.rstrip("/"):
        raise ValueError(f"S3_ENDPOINT_URL={theirs} (read by mosaicml-streaming for shards) differs from "
                         f"AWS_ENDPOINT_URL={ours} (read by boto3 for manifests); point both at the same endpoint")
    if theirs and not ours:
        raise ValueError(f"S3_ENDPOINT_URL={theirs} is set but AWS_ENDPOINT_URL is not: manifests are read with "
                         "boto3's standard configuration; set AWS_ENDPOINT_URL to the same endpoint")


@dataclass
class SplitInfo:
    manifest: Manifest
    index_text: str
    shard_names: list[str]
    shard_samples: list[int]
    all_have_sha1: bool


def _check_present(split_uri: str, names: list[str], index_uri: str) -> None:
    present = list_sizes(split_uri)
    missing = [n for n in names if n not in present]
    if missing:
        more = " ..." if len(missing) > 5 else ""
        raise DataSourceError(f"{len(missing)} shard file(s) listed in {index_uri} are missing: "
                              + ", ".join(join(split_uri, n) for n in missing[:5]) + more)


def read_split(uri: str, split: str, verify: str = "size") -> SplitInfo:
    """Manifest, index and shard files of a split, checked against each other before streaming reads them; the
    shards' sizes (and with ``verify="sha256"`` their digests, read up front) against the manifest (``verify``)."""
    check_verify_mode(verify)
    split_uri = join(uri, split)
    manifest_uri, index_uri = join(split_uri, MANIFEST_NAME), join(split_uri, INDEX_NAME)
    manifest = read_manifest(uri, split, "mds")
    index_text = read_text(index_uri)
    try:
        index = json.loads(index_text)
        shards = index["shards"]
        names = [s["raw_data"]["basename"] for s in shards]
        counts = [int(s["samples"]) for s in shards]
        sizes = [int(s["raw_data"]["bytes"]) for s in shards]
        formats = {s["format"] for s in shards}
        columns = [dict(zip(s["column_names"], s["column_encodings"])) for s in shards]
        all_have_sha1 = all("sha1" in (s["raw_data"].get("hashes") or {}) for s in shards)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{index_uri} is not a valid MDS index ({type(e).__name__}: {e})") from None
    if formats - {"mds"}:
        raise ValueError(f"{index_uri} lists shards of format {sorted(formats)}; this reader reads MDS")
    for name, cols in zip(names, columns):
        if any(cols.get(c) != enc for c, enc in COLUMNS.items()):
            raise ValueError(f"{index_uri}: shard {name} has columns {cols}, expected {COLUMNS}")
    listed = [(s.name, s.num_samples) for s in manifest.shards]
    if listed != list(zip(names, counts)):
        raise ValueError(f"{manifest_uri} and {index_uri} disagree on the shards (manifest: {len(listed)} shards, "
                         f"{manifest.num_samples} samples; index: {len(names)} shards, {sum(counts)} samples)")
    if [s.bytes for s in manifest.shards] != sizes:
        raise ValueError(f"{manifest_uri} and {index_uri} disagree on the shards' sizes; rewrite the split with "
                         "`tarflow data write`")
    if verify == "none":  # still every shard present: streaming would hang or run short on a missing one
        _check_present(split_uri, names, index_uri)
    else:
        check_shard_sizes(split_uri, manifest, verify)
    if verify == "sha256":
        check_shard_digests(split_uri, manifest)
    return SplitInfo(manifest, index_text, names, counts, all_have_sha1)


def digest(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]

