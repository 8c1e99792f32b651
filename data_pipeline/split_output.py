"""Where a write puts a split's files: a local directory or an ``s3://`` prefix, each file published whole.

Locally a file is written under a temporary name and renamed, so its final name only ever holds complete bytes; on S3
an object appears only once its upload has completed. A killed write therefore leaves at most a temporary file
(removed by the next write of the same part), never a truncated file under a final name. (A crash of the machine
itself may still leave a renamed file short or empty, as nothing is fsynced: fsync cost 40 ms a file here, most of a
write of small shards; a resumed write checks each finished shard's size, so it rewrites such a file.)
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .storage import DataSourceError, exists, is_s3, join, list_sizes, read_text, split_s3, upload_file

TEMP_MARK = ".tmp-"  # NAME.tmp-PID: a file being written


class SplitOutput:
    def __init__(self, out: str, split: str):
        self.uri = join(out, split)
        self._local = None if is_s3(out) else Path(self.uri)

    def where(self, name: str) -> str:
        return join(self.uri, name)

    def put(self, name: str, data: bytes) -> None:
        if self._local is None:
            with tempfile.TemporaryDirectory(prefix="tarflow-upload-") as staging:
                path = Path(staging, name)
                path.write_bytes(data)
                upload_file(path, self.where(name))  # boto3's transfer manager: multipart and retries
            return
        self._local.mkdir(parents=True, exist_ok=True)
        final = self._local / name
        temp = self._local / f"{name}{TEMP_MARK}{os.getpid()}"
        temp.write_bytes(data)
        os.replace(temp, final)

    def read(self, name: str) -> str | None:
        """The text of a file, or None when there is none."""
        if not exists(self.where(name)):
            return None
        return read_text(self.where(name))

    def sizes(self) -> dict[str, int]:
        """File name → size of the split's files ({} before anything was written)."""
        if self._local is not None and not self._local.is_dir():
            return {}
        return list_sizes(self.uri)

    def delete(self, name: str) -> None:
        if self._local is not None:
            (self._local / name).unlink(missing_ok=True)
            return
        from .s3 import s3_client

        bucket, key = split_s3(self.where(name))
        try:
            s3_client().delete_object(Bucket=bucket, Key=key)
        except Exception as e:
            raise DataSourceError(f"cannot delete {self.where(name)}: {type(e).__name__}: {e}") from None

    def remove_temporary(self, prefixes: tuple[str, ...]) -> None:
        """Delete the temporary files a killed write left for names starting with one of ``prefixes`` (local only:
        an S3 upload is staged in a local temporary directory)."""
        if self._local is None or not self._local.is_dir():
            return
        for path in self._local.iterdir():
            if path.name.startswith(prefixes) and TEMP_MARK in path.name:
                path.unlink(missing_ok=True)
