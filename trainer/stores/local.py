"""A store on a local (or shared network) directory.

Every write goes to a temporary file in the destination directory, is fsynced, renamed into place and the directory
fsynced, so that after a crash a key holds either its old content, its new content, or nothing. Temporary files carry
``TMP_MARK`` in their name and listings skip them.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

from trainer.stores import TMP_MARK, ObjectInfo, ObjectNotFound, Store, StoreError, check_key, check_prefix, mismatch

_CHUNK = 1 << 20


def tmp_path_for(final: Path) -> Path:
    """A unique temporary name beside ``final`` (same directory, so the rename is atomic)."""
    return final.with_name(f".{final.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")


def fsync_dir(path: Path) -> None:
    # Makes a rename or a new entry in ``path`` durable; not every filesystem allows it, hence the broad except.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def makedirs_durable(path: Path) -> None:
    """mkdir -p, fsyncing the parent of each directory created (a new checkpoint directory survives a crash)."""
    if path.is_dir():
        return
    makedirs_durable(path.parent)
    try:
        path.mkdir()
    except FileExistsError:
        return
    fsync_dir(path.parent)


def _read_chunks(f: BinaryIO) -> Iterator[bytes]:
    while block := f.read(_CHUNK):
        yield block


def write_tmp(final: Path, chunks: Iterable[bytes]) -> tuple[Path, str, int]:
    """Write ``chunks`` to a fsynced temporary file beside ``final``; returns (tmp path, sha256 hex, size)."""
    for attempt in range(3):
        makedirs_durable(final.parent)
        tmp = tmp_path_for(final)
        try:
            f = open(tmp, "xb")
        except FileNotFoundError:
            # A concurrent delete() pruned the (empty) directory between mkdir and open: make it again.
            if attempt == 2:
                raise
            continue
        break
    h = hashlib.sha256()
    size = 0
    try:
        with f:
            for block in chunks:
                f.write(block)
                h.update(block)
                size += len(block)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp, h.hexdigest(), size


class LocalStore(Store):
    def __init__(self, root: str | Path):
        self.root = Path(root).absolute()

    @classmethod
    def from_uri(cls, uri: str, **options) -> LocalStore:
        return cls(uri[len("file://"):] if uri.startswith("file://") else uri, **options)

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    def uri_for(self, key: str) -> str:
        return str(self.root / key) if key else str(self.root)

    # -- writes ------------------------------------------------------------------------------------------------------

    def _put(self, key: str, chunks: Iterable[bytes]) -> ObjectInfo:
        final = self._path(key)
        try:
            tmp, digest, size = write_tmp(final, chunks)
            os.replace(tmp, final)
            fsync_dir(final.parent)
        except OSError as e:
            raise StoreError(f"cannot write {self.uri_for(key)}: {e}") from e
        return ObjectInfo(key, size, digest)

    def put_file(self, key: str, local_path: str | Path) -> ObjectInfo:
        try:
            src = open(local_path, "rb")
        except OSError as e:
            raise StoreError(f"cannot read {local_path} for {self.uri_for(key)}: {e}") from e
        with src:
            return self._put(key, _read_chunks(src))

    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        return self._put(key, [data])

    # -- reads -------------------------------------------------------------------------------------------------------

    def _open(self, key: str) -> BinaryIO:
        try:
            return open(self._path(key), "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(f"{self.uri_for(key)} does not exist") from None
        except OSError as e:
            raise StoreError(f"cannot read {self.uri_for(key)}: {e}") from e

    def get_file(self, key: str, local_path: str | Path, expected_sha256: str | None = None,
                 expected_size: int | None = None) -> None:
        dest = Path(local_path)
        with self._open(key) as src:
            try:
                tmp, digest, size = write_tmp(dest, _read_chunks(src))
            except OSError as e:
                raise StoreError(f"cannot download {self.uri_for(key)} to {dest}: {e}") from e
        problem = None
        if expected_size is not None and size != expected_size:
            problem = mismatch(self.uri_for(key), "size", expected_size, size)
        elif expected_sha256 is not None and digest != expected_sha256:
            problem = mismatch(self.uri_for(key), "sha256", expected_sha256, digest)
        if problem:
            tmp.unlink(missing_ok=True)
            raise StoreError(problem)
        os.replace(tmp, dest)

    def get_bytes(self, key: str, expected_sha256: str | None = None) -> bytes:
        with self._open(key) as src:
            data = src.read()
        if expected_sha256 is not None and (digest := hashlib.sha256(data).hexdigest()) != expected_sha256:
            raise StoreError(mismatch(self.uri_for(key), "sha256", expected_sha256, digest))
        return data

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        check_prefix(prefix)
        # Only the directory part of the prefix names a place to walk; the rest is a string comparison.
        head = prefix.rpartition("/")[0]
        start = self.root.joinpath(*head.split("/")) if head else self.root
        found = []
        for dirpath, dirnames, filenames in os.walk(start):
            rel_dir = os.path.relpath(dirpath, self.root).replace(os.sep, "/")
            rel_dir = "" if rel_dir == "." else rel_dir + "/"
            # Descend only into directories that can hold matching keys.
            dirnames[:] = [d for d in dirnames if (rel_dir + d + "/").startswith(prefix)
                           or prefix.startswith(rel_dir + d + "/")]
            for name in filenames:
                key = rel_dir + name
                if TMP_MARK in name or not key.startswith(prefix):
                    continue
                try:
                    size = os.stat(os.path.join(dirpath, name)).st_size
                except FileNotFoundError:  # deleted while we walked
                    continue
                found.append(ObjectInfo(key, size))
        return sorted(found, key=lambda o: o.key)

    def delete(self, keys: Iterable[str]) -> None:
        for key in keys:
            path = self._path(key)
            try:
                path.unlink(missing_ok=True)
            except OSError as e:
                raise StoreError(f"cannot delete {self.uri_for(key)}: {e}") from e
            # Prune directories left empty (old checkpoint steps), never the root. Not fsynced: a delete that is
            # undone by a crash only leaves an old object behind.
            parent = path.parent
            while parent != self.root and self.root in parent.parents:
                try:
                    parent.rmdir()
                except OSError:
                    break
                parent = parent.parent
