"""data.verify: a shard missing, shortened or (sha256) changed on disk or in S3 is refused with a message naming it,
before the first step for sizes, as it is read for digests; webdataset and MDS."""

import hashlib
import io
import itertools
import json
import tarfile
import time
from pathlib import Path

import boto3
import pytest

from data_pipeline.config import DataConfig
from data_pipeline.mds_layout import read_split
from data_pipeline.sources import Source, open_source
from data_pipeline.storage import DataSourceError, join, read_bytes
from data_pipeline.webdataset_loader import WebDatasetLoader
from data_pipeline.writer import write_dataset

FIX = "rewrite the split with `tarflow data write` (or restore the shard)"


def _source() -> Source:
    src = open_source("digits")
    return Source(src.name, src.num_classes, src.image_shape,
                  {"train": lambda: itertools.islice(src.splits["train"](), 64),
                   "heldout": lambda: itertools.islice(src.splits["heldout"](), 24)},
                  {"train": 64, "heldout": 24})


def _write(uri: str, fmt: str = "webdataset") -> str:
    write_dataset(_source(), uri, fmt, shard_size=10600, encoding="png")  # 4 samples a webdataset shard
    return uri


def _listed(uri: str, split: str, name: str) -> dict:
    manifest = json.loads(read_bytes(join(uri, split, "manifest.json")))
    return next(s for s in manifest["shards"] if s["name"] == name)


def _loader(uri: str, split: str = "train", **kw) -> WebDatasetLoader:
    cfg = DataConfig(format="webdataset", uri=uri, shuffle_buffer=8, **kw)
    return WebDatasetLoader(cfg, split, 4, seed=0)


def _refused_at_construction(make) -> str:
    start = time.perf_counter()
    with pytest.raises(DataSourceError) as info:
        make()
    assert time.perf_counter() - start < 5  # a listing, not a read of the data
    return str(info.value)


def _relabelled(data: bytes) -> bytes:
    """The same tar with its first label changed to another digit: same size, other bytes."""
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(data)) as src, tarfile.open(fileobj=out, mode="w",
                                                                   format=tarfile.USTAR_FORMAT) as dst:
        done = False
        for member in src.getmembers():
            body = src.extractfile(member).read()
            if member.name.endswith(".cls") and not done:
                body, done = str((int(body) + 1) % 10).encode(), True
            info = tarfile.TarInfo(member.name)
            info.size = len(body)
            dst.addfile(info, io.BytesIO(body))
    out.write(b"\0" * (len(data) - len(out.getvalue())))  # tarfile pads to its record size: same length
    assert len(out.getvalue()) == len(data) and out.getvalue() != data
    return out.getvalue()


# -- webdataset, local ---------------------------------------------------------------------------------------------
@pytest.fixture
def local(tmp_path) -> str:
    return _write(str(tmp_path / "data"))


def test_a_shortened_shard_is_refused_at_construction(local):
    shard = Path(local, "train", "shard-000005.tar")
    expected = _listed(local, "train", shard.name)["bytes"]
    shard.write_bytes(shard.read_bytes()[:4096])
    message = _refused_at_construction(lambda: _loader(local))
    assert message == (f"shard {shard} has 4096 bytes but {Path(local, 'train', 'manifest.json')} lists {expected} "
                       f"(truncated or replaced since the manifest was written); {FIX}")
    _loader(local, verify="none")  # not checked: it fails only when read


def test_missing_shards_are_refused_at_construction(local):
    for i in (1, 3):
        Path(local, "heldout", f"shard-00000{i}.tar").unlink()
    expected = _listed(local, "heldout", "shard-000001.tar")["bytes"]
    message = _refused_at_construction(lambda: _loader(local, "heldout"))
    assert message == (f"shard missing: {Path(local, 'heldout', 'shard-000001.tar')} "
                       f"({Path(local, 'heldout', 'manifest.json')} lists it with {expected} bytes, and 1 more "
                       f"shard(s) are missing); {FIX}")


@pytest.mark.parametrize("split,workers", [("heldout", 0), ("train", 1)])
def test_with_sha256_a_changed_shard_is_refused_when_read(local, split, workers):
    shard = Path(local, split, "shard-000002.tar")
    shard.write_bytes(_relabelled(shard.read_bytes()))
    listed = _listed(local, split, shard.name)["sha256"]
    actual = hashlib.sha256(shard.read_bytes()).hexdigest()
    batches = sum(1 for _ in itertools.islice(_loader(local, split, num_workers=workers), 20))
    assert batches  # the size is right: data.verify=size reads it
    with pytest.raises(DataSourceError) as info:
        list(itertools.islice(_loader(local, split, num_workers=workers, verify="sha256"), 20))
    assert str(info.value) == (f"shard {shard} has sha256 {actual} but {Path(local, split, 'manifest.json')} "
                               f"lists {listed} (changed since the manifest was written); {FIX}")


def test_with_sha256_intact_shards_read_as_without(local):
    """Runs that start and end inside shards (training streams, ranks sharing a held-out shard) hash them whole."""
    for split, world_size in (("train", 1), ("heldout", 2), ("heldout", 5)):
        for rank in range(world_size):
            def read(verify: str) -> list:
                cfg = DataConfig(format="webdataset", uri=local, shuffle_buffer=8, streams=2, verify=verify)
                loader = WebDatasetLoader(cfg, split, 2, seed=0, rank=rank, world_size=world_size)
                return [b.indices.tolist() for b in itertools.islice(loader, 2 * loader.batches_per_epoch)]
            assert read("sha256") == read("size")


def test_an_unknown_mode_is_refused(local):
    with pytest.raises(ValueError, match=r"data.verify='md5' is not one of \['size', 'sha256', 'none'\]"):
        _loader(local, verify="md5")


# -- webdataset, S3 ------------------------------------------------------------------------------------------------
def test_s3_shortened_missing_and_changed_shards(s3_bucket):
    uri = _write(f"s3://{s3_bucket}/digits")
    s3 = boto3.client("s3")
    key = "digits/train/shard-000004.tar"
    data = s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
    where = f"{uri}/train/manifest.json"
    s3.put_object(Bucket=s3_bucket, Key=key, Body=data[:2048])
    assert _refused_at_construction(lambda: _loader(uri)) == (
        f"shard s3://{s3_bucket}/{key} has 2048 bytes but {where} lists {len(data)} (truncated or replaced since "
        f"the manifest was written); {FIX}")
    s3.delete_object(Bucket=s3_bucket, Key=key)
    assert _refused_at_construction(lambda: _loader(uri)) == (
        f"shard missing: s3://{s3_bucket}/{key} ({where} lists it with {len(data)} bytes); {FIX}")
    changed = _relabelled(data)
    s3.put_object(Bucket=s3_bucket, Key=key, Body=changed)
    with pytest.raises(DataSourceError, match=rf"shard s3://{s3_bucket}/{key} has sha256 "
                                              rf"{hashlib.sha256(changed).hexdigest()} but"):
        list(itertools.islice(_loader(uri, verify="sha256"), 40))


# -- MDS -----------------------------------------------------------------------------------------------------------
def test_mds_shortened_and_changed_shards(tmp_path):
    uri = _write(str(tmp_path / "mds"), "mds")
    shard = Path(uri, "train", "shard.00000.mds")
    data = shard.read_bytes()
    shard.write_bytes(data[:100])
    assert _refused_at_construction(lambda: read_split(uri, "train")) == (
        f"shard {shard} has 100 bytes but {Path(uri, 'train', 'manifest.json')} lists {len(data)} (truncated or "
        f"replaced since the manifest was written); {FIX}")
    changed = bytearray(data)
    changed[-1] ^= 0xFF
    shard.write_bytes(bytes(changed))
    read_split(uri, "train")  # the size is right
    with pytest.raises(DataSourceError) as info:
        read_split(uri, "train", verify="sha256")
    assert str(info.value) == (
        f"shard {shard} has sha256 {hashlib.sha256(changed).hexdigest()} but {Path(uri, 'train', 'manifest.json')} "
        f"lists {hashlib.sha256(data).hexdigest()} (changed since the manifest was written); {FIX}")
