"""What a shard file holds, per format: a sample's bytes in it, the size that counts against ``--shard-size``, the
whole shard's bytes, its name, and (MDS) its entry of streaming's ``index.json``.

The writer decides where shards end (``ShardFormat.full``) and builds each shard in memory, so that a shard can be
hashed, named and published whole: written under a temporary name and renamed, or uploaded, never half there.

- webdataset: plain tar files (``tar tf`` lists ``KEY.png``/``KEY.cls`` pairs); members carry mtime 0, mode 0444,
  uid/gid 0 and no user names, so the bytes depend only on the samples.
- mds: ``streaming.MDSWriter``'s own encoding of samples and shards, and its size rule (a shard ends before the
  sample that would take it over ``size_limit``, counting its header and 4 bytes a sample), so the files equal
  those MDSWriter writes from the same samples (tests/test_writer.py compares them), except that a first sample
  larger than the limit gets a shard of its own instead of MDSWriter's empty shard before it.
"""

from __future__ import annotations

import io
import json
import tarfile
import tempfile
from typing import Any

from .codecs import EXTENSIONS, LABEL_EXTENSION, encode_label
from .mds_layout import COLUMNS, INDEX_NAME

Record = Any  # one sample as the format stores it


class ShardFormat:
    name: str
    empty_shard_bytes: int  # what an empty shard counts against the size limit

    def __init__(self, shard_size: int, encoding: str):
        self.shard_size, self.encoding = shard_size, encoding

    def record(self, key: str, image: bytes, label: int) -> Record: ...
    def record_bytes(self, record: Record) -> int: ...
    def shard_bytes(self, records: list[Record]) -> bytes: ...
    def shard_name(self, prefix: str, number: int) -> str: ...

    def full(self, counted: int, num_records: int, record: Record) -> bool:
        """Whether a shard holding ``num_records`` records that count ``counted`` bytes must end before ``record``
        (a shard holds at least one record, however large)."""
        return num_records > 0 and counted + self.record_bytes(record) > self.shard_size

    def index_entry(self, name: str, data: bytes, num_records: int) -> dict | None:
        """The shard's entry in the format's own index (MDS), or None."""
        return None

    @staticmethod
    def index_files(entries: list[dict | None]) -> dict[str, str]:
        """File name → text of the format's own index of a split, published before the manifest."""
        return {}

    def close(self) -> None:
        pass


class WebDatasetShards(ShardFormat):
    name = "webdataset"
    empty_shard_bytes = 0

    def record(self, key, image, label):
        return [(f"{key}.{EXTENSIONS[self.encoding]}", image), (f"{key}.{LABEL_EXTENSION}", encode_label(label))]

    def record_bytes(self, record):
        return sum(len(data) + 1024 for _, data in record)  # tar headers and padding

    def shard_bytes(self, records):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for members in records:
                for name, data in members:
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime, info.mode = len(data), 0, 0o444  # reproducible bytes
                    tar.addfile(info, io.BytesIO(data))
        return buffer.getvalue()

    def shard_name(self, prefix, number):
        return f"{prefix}shard-{number:06d}.tar"


class MDSShards(ShardFormat):
    name = "mds"

    def __init__(self, shard_size: int, encoding: str):
        from streaming import MDSWriter

        super().__init__(shard_size, encoding)
        # The writer serves as the encoder only (it is never given a sample to write, so it writes no file and starts
        # no upload thread); it wants an empty local directory of its own.
        self._scratch = tempfile.TemporaryDirectory(prefix="tarflow-mds-encoder-")
        self._writer = MDSWriter(out=self._scratch.name, columns=COLUMNS, size_limit=shard_size, hashes=["sha1"])
        self.empty_shard_bytes = self._writer.extra_bytes_per_shard

    def record(self, key, image, label):
        return self._writer.encode_sample({"key": key, "image": image, "label": int(label)})

    def record_bytes(self, record):
        return len(record) + self._writer.extra_bytes_per_sample

    def shard_bytes(self, records):
        self._writer.new_samples = records
        try:
            return self._writer.encode_joint_shard()
        finally:
            self._writer.new_samples = []

    def shard_name(self, prefix, number):
        return f"{prefix}shard.{number:05d}.mds"

    def index_entry(self, name, data, num_records):
        from streaming.base.hashing import get_hash

        # As JointWriter.flush_shard records a shard (uncompressed: no zip_data).
        raw = {"basename": name, "bytes": len(data), "hashes": {a: get_hash(a, data) for a in self._writer.hashes}}
        return {"samples": num_records, "raw_data": raw, "zip_data": None, **self._writer.get_config()}

    @staticmethod
    def index_files(entries):
        return {INDEX_NAME: json.dumps({"version": 2, "shards": entries}, sort_keys=True)}  # as MDSWriter's

    def close(self):
        self._writer.executor.shutdown(wait=False)
        self._scratch.cleanup()


SHARD_FORMATS: dict[str, type[ShardFormat]] = {"webdataset": WebDatasetShards, "mds": MDSShards}
