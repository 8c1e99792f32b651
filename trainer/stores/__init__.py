"""Stores: bytes by key, for a local directory or S3. They know nothing about checkpoints; the checkpoint manager
builds its commit protocol (shards first, manifest last) on top of any of them.

Keys are '/'-separated relative strings (``step-00000010/model.pt``). ``list(prefix)`` takes a *raw string* prefix,
as S3 does: ``list("step-1")`` also returns ``step-10/...``; pass ``"step-1/"`` for one "directory".

Adding a store (GCS, say) is one new module with a ``Store`` subclass and one line in ``STORES``.
"""

from __future__ import annotations

import abc
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

# Temporary files (local writes, downloads) carry this marker so that listings can skip them; keys may not contain it.
TMP_MARK = ".store-tmp-"


class StoreError(RuntimeError):
    """A store operation that failed: bad key, missing object, checksum mismatch, unreachable or refusing endpoint."""


class ObjectNotFound(StoreError):
    """The key does not exist (a subclass, so that callers can tell "absent" from "broken")."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    sha256: str | None = None  # hex digest; listings leave it None (neither backend can give it cheaply)


def check_key(key: str) -> str:
    """Return ``key`` if it is a clean relative '/'-separated key, else raise StoreError."""
    if not isinstance(key, str) or not key:
        raise StoreError(f"invalid key {key!r}: must be a non-empty string")
    if key.startswith("/") or "\\" in key or "\0" in key:
        raise StoreError(f"invalid key {key!r}: must be relative, '/'-separated, without backslashes or NUL")
    for part in key.split("/"):
        if part in ("", ".", ".."):
            raise StoreError(f"invalid key {key!r}: empty, '.' or '..' parts are not allowed")
        if TMP_MARK in part:
            raise StoreError(f"invalid key {key!r}: {TMP_MARK!r} is reserved for temporary files")
    return key


def check_prefix(prefix: str) -> str:
    """A listing prefix: '' or a raw string prefix of keys (it may end in '/' or in the middle of a part)."""
    if prefix == "":
        return prefix
    # The part before the last '/' must be a valid key path (it names a directory for the local store); the tail is
    # only compared as a string, so it may be any start of a part, or empty.
    head, _, tail = prefix.rpartition("/")
    if head:
        check_key(head)
    elif prefix.startswith("/"):
        raise StoreError(f"invalid prefix {prefix!r}: must be relative")
    if "\\" in tail or "\0" in tail:
        raise StoreError(f"invalid prefix {prefix!r}")
    return prefix


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> tuple[str, int]:
    """(hex sha256, size) of a local file, read in chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


def mismatch(uri: str, what: str, expected: object, actual: object) -> str:
    return f"{what} mismatch for {uri}: expected {expected}, got {actual}"


class Store(abc.ABC):
    """Bytes by key. Every write is all-or-nothing: a reader sees the old object, the new one, or none."""

    @classmethod
    @abc.abstractmethod
    def from_uri(cls, uri: str, **options) -> Store: ...

    @abc.abstractmethod
    def put_file(self, key: str, local_path: str | Path) -> ObjectInfo:
        """Upload a local file; returns its size and sha256."""

    @abc.abstractmethod
    def put_bytes(self, key: str, data: bytes) -> ObjectInfo: ...

    @abc.abstractmethod
    def get_file(self, key: str, local_path: str | Path, expected_sha256: str | None = None,
                 expected_size: int | None = None) -> None:
        """Download to ``local_path`` (tmp + rename: never a partial file there), verifying what is given."""

    @abc.abstractmethod
    def get_bytes(self, key: str, expected_sha256: str | None = None) -> bytes: ...

    @abc.abstractmethod
    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Every object whose key starts with the raw string ``prefix``, sorted by key."""

    @abc.abstractmethod
    def delete(self, keys: Iterable[str]) -> None:
        """Delete the keys; missing ones are fine."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    def uri_for(self, key: str) -> str:
        """Where ``key`` lives, for messages."""


# Imported last: the backends import the base definitions above from this package.
from trainer.stores.local import LocalStore  # noqa: E402
from trainer.stores.s3 import S3Store  # noqa: E402

STORES: dict[str, type[Store]] = {"file": LocalStore, "s3": S3Store}


def open_store(uri: str, **options) -> Store:
    """``s3://bucket/prefix`` → S3Store; ``file:///dir`` or a plain path → LocalStore. ``options`` go to the
    constructor (retry and transfer settings)."""
    scheme = uri.split("://", 1)[0] if "://" in uri else "file"
    if scheme not in STORES:
        raise StoreError(f"unknown store scheme {scheme!r} in {uri!r}; known: {sorted(STORES)}")
    return STORES[scheme].from_uri(uri, **options)


__all__ = ["Store", "ObjectInfo", "StoreError", "ObjectNotFound", "STORES", "open_store", "LocalStore", "S3Store",
           "check_key", "check_prefix", "sha256_file", "TMP_MARK"]
