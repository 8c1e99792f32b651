"""Writing shards: plain tar files and MDS, with manifests that describe them exactly, locally and on S3."""

import hashlib
import json
import subprocess
import tarfile

import numpy as np
import pytest

from data_pipeline.codecs import decode_image, decode_label
from data_pipeline.embedded import load_embedded, split_heldout
from data_pipeline.manifest import Manifest, sha256_file
from data_pipeline.sources import open_source
from data_pipeline.storage import read_bytes, read_text
from data_pipeline.writer import write_dataset
from tarflow.data import parse_size
from tarflow.main import main


def tar_samples(path):
    """{key: (image bytes, label bytes)} in tar order, read with the standard library."""
    out = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return out


def test_webdataset_shards_hold_every_sample_once_and_match_the_manifest(tmp_path):
    manifests = write_dataset(open_source("digits"), str(tmp_path), "webdataset", shard_size=20_000)
    data = load_embedded("digits")
    train_idx, heldout_idx = split_heldout(len(data.images), 0.1, 0)
    for split, idx in (("train", train_idx), ("heldout", heldout_idx)):
        manifest = Manifest.from_json((tmp_path / split / "manifest.json").read_text(), split)
        assert manifest == manifests[split]
        assert (manifest.num_samples, manifest.num_classes, manifest.image_shape) == (len(idx), 10, [1, 8, 8])
        seen = {}
        for shard in manifest.shards:
            path = tmp_path / split / shard.name
            assert shard.bytes == path.stat().st_size and shard.sha256 == sha256_file(path)
            samples = tar_samples(path)
            assert len(samples) == shard.num_samples
            assert max(shard.bytes for shard in manifest.shards) <= 20_000 + 4096
            seen.update(samples)
        assert sorted(seen) == [f"{split}-{i:08d}" for i in idx]
        for key, members in seen.items():
            i = int(key.split("-")[1])
            image = decode_image(members["png"], "png", (1, 8, 8), "s", key)
            assert np.array_equal(image, data.images[i])
            assert decode_label(members["cls"], "s", key) == data.labels[i]


def test_tar_shards_are_plain_tar_files(tmp_path):
    write_dataset(open_source("digits"), str(tmp_path), "webdataset", shard_size=1 << 20)
    listing = subprocess.run(["tar", "tf", str(tmp_path / "heldout" / "shard-000000.tar")], capture_output=True,
                             text=True, check=True).stdout.split()
    assert listing[:2] == ["heldout-00000006.png", "heldout-00000006.cls"]
    assert len(listing) == 2 * 180


def test_mds_shards_are_written_with_streaming(tmp_path):
    from streaming.base.format import reader_from_json

    manifests = write_dataset(open_source("digits"), str(tmp_path), "mds", shard_size=8_000, encoding="raw")
    index = json.loads((tmp_path / "train" / "index.json").read_text())
    assert len(index["shards"]) == len(manifests["train"].shards) > 1
    data = load_embedded("digits")
    shard = reader_from_json(str(tmp_path / "train"), None, index["shards"][0])
    first = shard.get_item(0)
    i = int(first["key"].split("-")[1])
    assert np.array_equal(decode_image(first["image"], "raw", (1, 8, 8), "s", first["key"]), data.images[i])
    assert first["label"] == data.labels[i]


@pytest.mark.parametrize("encoding", ["png", "jpeg", "raw"])
def test_photos_round_trip_through_each_encoding(tmp_path, encoding):
    source = open_source("photos", image_size=16)
    write_dataset(source, str(tmp_path), "webdataset", encoding=encoding)
    manifest = Manifest.from_json((tmp_path / "heldout" / "manifest.json").read_text(), "x")
    samples = tar_samples(tmp_path / "heldout" / manifest.shards[0].name)
    expected = {key: image for key, image, _ in source.splits["heldout"]()}
    ext = {"png": "png", "jpeg": "jpg", "raw": "u8"}[encoding]
    for key, members in samples.items():
        image = decode_image(members[ext], encoding, (3, 16, 16), "s", key)
        if encoding == "jpeg":
            assert np.abs(image.astype(int) - expected[key]).mean() < 12  # lossy
        else:
            assert np.array_equal(image, expected[key])


def test_writing_to_s3_uploads_shards_then_the_manifest(tmp_path, s3_bucket):
    local = write_dataset(open_source("digits"), str(tmp_path), "webdataset", shard_size=50_000)
    remote = write_dataset(open_source("digits"), f"s3://{s3_bucket}/digits", "webdataset", shard_size=50_000)
    assert local == remote
    for shard in remote["train"].shards:
        assert hashlib.sha256(read_bytes(f"s3://{s3_bucket}/digits/train/{shard.name}")).hexdigest() == shard.sha256
    assert Manifest.from_json(read_text(f"s3://{s3_bucket}/digits/train/manifest.json"), "x") == remote["train"]


def test_npz_and_imagefolder_sources(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 12, 12, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images=images, labels=np.arange(20) % 4)
    source = open_source(f"npz:{tmp_path / 'd.npz'}", heldout_fraction=0.25)
    assert (source.num_classes, source.image_shape, source.counts) == (4, (3, 12, 12), {"train": 15, "heldout": 5})
    key, image, label = next(source.splits["train"]())
    assert np.array_equal(image, images[int(key.split("-")[1])].transpose(2, 0, 1))

    for c in ("cat", "dog"):
        (tmp_path / "folder" / c).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "folder" / c / f"{i}.x.png")
    source = open_source(f"imagefolder:{tmp_path / 'folder'}", image_size=8, heldout_fraction=0.34)
    assert (source.num_classes, source.image_shape) == (2, (3, 8, 8))
    samples = list(source.splits["train"]()) + list(source.splits["heldout"]())
    assert sorted(label for _, _, label in samples) == [0, 0, 0, 1, 1, 1]
    assert all(image.shape == (3, 8, 8) for _, image, _ in samples)
    assert all("." not in key for key, _, _ in samples)  # dots would read as webdataset extensions


@pytest.mark.parametrize("args, message", [
    (["--source", "nope"], "unknown --source 'nope'"),
    (["--source", "imagefolder:/does/not/exist"], "is not a directory"),
    (["--source", "npz:/does/not/exist.npz"], "does not exist"),
])
def test_write_command_rejects_bad_sources(tmp_path, capsys, args, message):
    assert main(["data", "write", *args, "--format", "webdataset", "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_write_command_writes_both_splits(tmp_path, capsys):
    assert main(["data", "write", "--source", "digits", "--format", "mds", "--out", str(tmp_path),
                 "--shard-size", "20KB"]) == 0
    out = capsys.readouterr().out
    assert "1617 samples" in out and "180 samples" in out
    assert (tmp_path / "train" / "index.json").exists() and (tmp_path / "heldout" / "manifest.json").exists()


def test_unreachable_s3_endpoint_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    code = main(["data", "write", "--source", "digits", "--format", "webdataset", "--out", "s3://bkt/x"])
    assert code == 2
    assert "cannot reach the S3 endpoint for s3://bkt/x" in capsys.readouterr().err


def test_parse_size():
    assert [parse_size(s) for s in ("4000", "64MB", "1MiB", "2 GB")] == [4000, 64_000_000, 2**20, 2_000_000_000]


def _files(root):
    """{relative path: bytes} of every file under a directory."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _objects(uri):
    from data_pipeline.storage import list_sizes

    return {f"{split}/{name}": read_bytes(f"{uri}/{split}/{name}")
            for split in ("heldout", "train") for name in list_sizes(f"{uri}/{split}")}


@pytest.mark.parametrize("fmt", ["webdataset", "mds"])
def test_workers_write_the_bytes_and_shard_boundaries_of_one_process_locally_and_on_s3(tmp_path, s3_bucket, fmt):
    source = open_source("photos", image_size=16)  # resizing and PNG encoding happen in the workers
    one = write_dataset(source, str(tmp_path / "one"), fmt, shard_size=30_000, workers=1)
    three = write_dataset(source, str(tmp_path / "three"), fmt, shard_size=30_000, workers=3)
    remote = write_dataset(source, f"s3://{s3_bucket}/two", fmt, shard_size=30_000, workers=2)
    assert one == three == remote and len(one["train"].shards) > 3
    files = _files(tmp_path / "one")
    assert files == _files(tmp_path / "three") == _objects(f"s3://{s3_bucket}/two")
    assert {"train/manifest.json", "heldout/write-progress.json"} <= set(files)


def test_workers_encode_a_source_that_can_only_be_iterated(tmp_path):
    from data_pipeline.sources import Source

    base = open_source("digits")
    iterated = Source(base.name, base.num_classes, base.image_shape, base.splits, base.counts,  # no sample_at
                      settings=base.settings)
    write_dataset(base, str(tmp_path / "indexed"), "webdataset", shard_size=20_000, workers=1)
    write_dataset(iterated, str(tmp_path / "iterated"), "webdataset", shard_size=20_000, workers=2)
    assert _files(tmp_path / "indexed") == _files(tmp_path / "iterated")


def test_mds_files_equal_those_streaming_mdswriter_writes_from_the_same_samples(tmp_path):
    from streaming import MDSWriter

    from data_pipeline.codecs import encode_image

    source = open_source("digits")
    write_dataset(source, str(tmp_path / "ours"), "mds", shard_size=6_000, workers=2)
    columns = {"key": "str", "image": "bytes", "label": "int"}
    with MDSWriter(out=str(tmp_path / "theirs"), columns=columns, size_limit=6_000, hashes=["sha1"]) as writer:
        for key, image, label in source.splits["train"]():
            writer.write({"key": key, "image": encode_image(image, "png"), "label": int(label)})
    theirs = _files(tmp_path / "theirs")
    ours = _files(tmp_path / "ours" / "train")
    assert len(theirs) > 10 and theirs == {name: ours[name] for name in theirs}  # index.json and every shard
