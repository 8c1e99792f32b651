import pytest

from data_pipeline.storage import DataSourceError, exists, join, read_bytes, split_s3, upload_file


def test_local_and_s3_read_the_same_bytes(tmp_path, s3_bucket):
    src = tmp_path / "a.bin"
    src.write_bytes(b"x" * 10_000)
    upload_file(src, str(tmp_path / "copy" / "a.bin"))
    upload_file(src, f"s3://{s3_bucket}/p/a.bin")
    assert read_bytes(str(tmp_path / "copy" / "a.bin")) == read_bytes(f"s3://{s3_bucket}/p/a.bin") == b"x" * 10_000
    assert exists(f"s3://{s3_bucket}/p/a.bin") and not exists(f"s3://{s3_bucket}/p/b.bin")


def test_missing_objects_and_buckets_are_named(s3_bucket, tmp_path):
    with pytest.raises(DataSourceError, match=f"s3://{s3_bucket}/nope does not exist"):
        read_bytes(f"s3://{s3_bucket}/nope")
    with pytest.raises(DataSourceError, match="bucket of s3://no-such-bucket-x/k does not exist"):
        read_bytes("s3://no-such-bucket-x/k")
    with pytest.raises(DataSourceError, match="does not exist"):
        read_bytes(str(tmp_path / "nope"))


def test_uri_helpers():
    assert join("s3://b/p/", "train", "x.tar") == "s3://b/p/train/x.tar"
    assert split_s3("s3://b/p/q") == ("b", "p/q")
    with pytest.raises(DataSourceError, match="has no bucket"):
        split_s3("s3:///x")
