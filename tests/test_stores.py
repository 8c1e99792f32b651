"""Stores (bytes by key): the same behaviour from LocalStore and S3Store (on the moto server), then what only S3 has:
multipart uploads, retries through injected faults (tests/fault_proxy.py), and clear errors that never carry secrets.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time

import boto3
import pytest

from trainer.stores import TMP_MARK, LocalStore, ObjectInfo, ObjectNotFound, S3Store, StoreError, open_store

MiB = 1 << 20
# Tiny delays and no botocore-level retries, so that the proxy sees exactly our attempts and tests stay fast.
FAST = dict(attempts=3, base_delay=0.001, max_delay=0.01, client_attempts=1, connect_timeout=1.0, read_timeout=10.0)
MULTIPART = dict(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_concurrency=2)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    return S3Store(request.getfixturevalue("s3_bucket"), "runs/r1", **FAST)


# -- the same behaviour from every store -----------------------------------------------------------------------------

def test_bytes_round_trip_reports_size_and_sha256(store):
    data = os.urandom(100_000)
    info = store.put_bytes("step-00000010/model.pt", data)
    assert info == ObjectInfo("step-00000010/model.pt", len(data), sha(data))
    assert store.get_bytes("step-00000010/model.pt") == data
    assert store.get_bytes("step-00000010/model.pt", expected_sha256=sha(data)) == data
    assert store.exists("step-00000010/model.pt")
    assert not store.exists("step-00000010/model")  # a prefix of a key is not a key
    assert not store.exists("step-00000010")


def test_file_round_trip_with_verification(store, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(data := os.urandom(300_001))
    info = store.put_file("a/b/c.bin", src)
    assert (info.size, info.sha256) == (len(data), sha(data))
    dest = tmp_path / "down" / "deeper" / "c.bin"  # parent directories are made
    store.get_file("a/b/c.bin", dest, expected_sha256=sha(data), expected_size=len(data))
    assert dest.read_bytes() == data
    assert sorted(os.listdir(dest.parent)) == ["c.bin"]  # no temporary file left beside it


def test_overwrite_replaces_content(store):
    store.put_bytes("k", b"old")
    store.put_bytes("k", b"new content")
    assert store.get_bytes("k") == b"new content"
    assert [o.size for o in store.list()] == [len(b"new content")]


def test_wrong_expectation_raises_and_leaves_no_file(store, tmp_path):
    data = b"checkpoint shard" * 1000
    store.put_bytes("step-1/shard.pt", data)
    dest = tmp_path / "out" / "shard.pt"
    wrong = "0" * 64
    with pytest.raises(StoreError) as err:
        store.get_file("step-1/shard.pt", dest, expected_sha256=wrong)
    message = str(err.value)
    assert store.uri_for("step-1/shard.pt") in message and wrong in message and sha(data) in message
    assert not dest.exists() and os.listdir(dest.parent) == []
    # An existing file at the destination is left as it was.
    dest.write_bytes(b"previous")
    with pytest.raises(StoreError, match="size"):
        store.get_file("step-1/shard.pt", dest, expected_size=len(data) + 1)
    assert dest.read_bytes() == b"previous" and os.listdir(dest.parent) == ["shard.pt"]
    with pytest.raises(StoreError, match=wrong):
        store.get_bytes("step-1/shard.pt", expected_sha256=wrong)


def test_missing_key(store, tmp_path):
    with pytest.raises(ObjectNotFound, match="does not exist"):
        store.get_bytes("nope/x")
    with pytest.raises(ObjectNotFound):
        store.get_file("nope/x", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    assert not store.exists("nope/x")


def test_list_is_sorted_with_a_raw_string_prefix(store):
    for key in ["step-2/a", "step-10/a", "step-1/b/c", "step-1/a", "top"]:
        store.put_bytes(key, key.encode())
    everything = store.list()
    assert [o.key for o in everything] == ["step-1/a", "step-1/b/c", "step-10/a", "step-2/a", "top"]
    assert all(o.size == len(o.key) for o in everything)
    # Raw prefixes, as S3 has them: "step-1" also matches "step-10/…"; "step-1/" is the one directory.
    assert [o.key for o in store.list("step-1")] == ["step-1/a", "step-1/b/c", "step-10/a"]
    assert [o.key for o in store.list("step-1/")] == ["step-1/a", "step-1/b/c"]
    assert [o.key for o in store.list("step-1/b")] == ["step-1/b/c"]
    assert [o.key for o in store.list("t")] == ["top"]
    assert store.list("nothing/") == [] and store.list("step-3") == []


def test_delete(store):
    for key in ["s/1", "s/2", "s/sub/3", "t/1"]:
        store.put_bytes(key, b"x")
    store.delete(["s/1", "s/sub/3", "never/existed"])
    assert [o.key for o in store.list()] == ["s/2", "t/1"]
    assert not store.exists("s/1") and store.exists("s/2")
    store.delete([])
    store.delete(iter(["s/2", "t/1"]))
    assert store.list() == []


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "..", "a//b", "a/", "./a", "a/./b", "a\\b",
                                 f"x{TMP_MARK}1-ab"])
def test_bad_keys_are_rejected(store, key, tmp_path):
    for call in (lambda: store.put_bytes(key, b"x"), lambda: store.get_bytes(key), lambda: store.exists(key),
                 lambda: store.delete([key]), lambda: store.get_file(key, tmp_path / "f")):
        with pytest.raises(StoreError, match="invalid key"):
            call()


@pytest.mark.parametrize("prefix", ["/x", "../", "a/../", "a//"])
def test_bad_prefixes_are_rejected(store, prefix):
    with pytest.raises(StoreError, match="invalid"):
        store.list(prefix)


def test_open_store_by_scheme(tmp_path):
    s3 = open_store("s3://bucket-name/runs/exp-1/", attempts=2)
    assert isinstance(s3, S3Store) and (s3.bucket, s3.prefix, s3.attempts) == ("bucket-name", "runs/exp-1/", 2)
    assert s3.uri_for("step-1/m.pt") == "s3://bucket-name/runs/exp-1/step-1/m.pt"
    assert open_store("s3://bucket-name").prefix == ""
    local = open_store(str(tmp_path / "ckpt"))
    assert isinstance(local, LocalStore) and local.root == tmp_path / "ckpt"
    assert open_store(f"file://{tmp_path}/ckpt").root == tmp_path / "ckpt"
    with pytest.raises(StoreError, match="unknown store scheme 'gs'"):
        open_store("gs://bucket/x")
    with pytest.raises(StoreError, match="bucket"):
        open_store("s3:///x")


# -- local only ------------------------------------------------------------------------------------------------------

def test_local_crash_mid_write_is_not_listed(tmp_path):
    store = LocalStore(tmp_path)
    store.put_bytes("step-1/model.pt", b"complete")
    # What a crash between "write the temporary file" and "rename it" leaves behind:
    (tmp_path / "step-1" / f".optim.pt{TMP_MARK}4242-deadbeef").write_bytes(b"half of a")
    assert [o.key for o in store.list()] == ["step-1/model.pt"]
    assert not store.exists("step-1/optim.pt")
    # and a successful write leaves no temporary file
    store.put_file("step-1/optim.pt", tmp_path / "step-1" / "model.pt")
    assert sorted(p.name for p in (tmp_path / "step-1").iterdir() if TMP_MARK not in p.name) == ["model.pt",
                                                                                                  "optim.pt"]
    assert len([p for p in (tmp_path / "step-1").iterdir() if TMP_MARK in p.name]) == 1  # only the crash's


def test_local_delete_prunes_empty_directories_but_not_the_root(tmp_path):
    store = LocalStore(tmp_path / "root")
    store.put_bytes("step-1/a/b/c", b"x")
    store.put_bytes("step-2/d", b"x")
    store.delete(["step-1/a/b/c"])
    assert sorted(os.listdir(tmp_path / "root")) == ["step-2"]
    store.delete(["step-2/d"])
    assert (tmp_path / "root").is_dir() and os.listdir(tmp_path / "root") == []
    assert store.list() == [] and LocalStore(tmp_path / "never-made").list() == []


# -- S3 only ---------------------------------------------------------------------------------------------------------

def _s3_object(bucket: str, key: str, **kwargs) -> dict:
    return boto3.client("s3").head_object(Bucket=bucket, Key=key, **kwargs)


def test_s3_large_file_goes_multipart_and_round_trips(s3_bucket, tmp_path):
    store = S3Store(s3_bucket, "p", **FAST, **MULTIPART)
    src = tmp_path / "big.bin"
    src.write_bytes(data := os.urandom(11 * MiB))  # 5 + 5 + 1 MiB
    info = store.put_file("step-1/big.bin", src)
    assert (info.size, info.sha256) == (len(data), sha(data))
    assert _s3_object(s3_bucket, "p/step-1/big.bin", PartNumber=1)["PartsCount"] == 3
    head = _s3_object(s3_bucket, "p/step-1/big.bin")
    assert head["ETag"].endswith('-3"') and head["Metadata"] == {"sha256": sha(data)}  # our whole-object digest
    dest = tmp_path / "back.bin"
    store.get_file("step-1/big.bin", dest, expected_sha256=sha(data), expected_size=len(data))  # ranged GETs
    assert dest.read_bytes() == data


def test_s3_small_file_is_one_put_with_metadata(s3_bucket, tmp_path):
    src = tmp_path / "small.bin"
    src.write_bytes(data := b"small" * 100)
    S3Store(s3_bucket, **FAST, **MULTIPART).put_file("small.bin", src)
    head = _s3_object(s3_bucket, "small.bin", ChecksumMode="ENABLED")
    assert "-" not in head["ETag"] and head["Metadata"] == {"sha256": sha(data)}
    assert head["ChecksumSHA256"]  # S3's own checksum was asked for too


def test_s3_prefixes_do_not_see_each_other(s3_bucket):
    a, ab = S3Store(s3_bucket, "runs/a", **FAST), S3Store(s3_bucket, "runs/ab/", **FAST)
    a.put_bytes("k", b"a")
    ab.put_bytes("k", b"ab")
    assert [o.key for o in a.list()] == ["k"] and [o.key for o in ab.list()] == ["k"]
    assert a.get_bytes("k") == b"a" and ab.get_bytes("k") == b"ab"
    a.delete(["k"])
    assert ab.exists("k") and not a.exists("k")


def test_s3_listing_is_paginated_and_deletes_are_batched(s3_bucket, fault_proxy):
    store = S3Store(s3_bucket, "p", list_page_size=2, delete_batch_size=2, **FAST)
    keys = [f"step-{i}/x" for i in range(5)]
    for key in keys:
        store.put_bytes(key, b"x")
    assert [o.key for o in store.list()] == keys
    assert fault_proxy.count("GET", "list-type=2") == 3  # pages of 2, 2, 1
    store.delete(keys)
    assert fault_proxy.count("POST", "delete") == 3
    assert store.list() == []


def test_s3_transient_503s_are_retried(s3_bucket, fault_proxy):
    store = S3Store(s3_bucket, **FAST)
    fault_proxy.fail_next(2, status=503, method="PUT", path_contains="step-")
    info = store.put_bytes("step-1/model.pt", data := os.urandom(5000))
    assert info.sha256 == sha(data) and store.get_bytes("step-1/model.pt") == data
    assert fault_proxy.faults == 2 and fault_proxy.count("PUT", "step-1/model.pt") == 3


def test_s3_botocore_retries_compose_with_ours(s3_bucket, fault_proxy):
    # One outer attempt, three botocore attempts: botocore alone absorbs the two failures.
    store = S3Store(s3_bucket, **{**FAST, "attempts": 1, "client_attempts": 3})
    fault_proxy.fail_next(2, status=500, method="GET", path_contains="list-type=2")
    store.put_bytes("a", b"1")
    assert [o.key for o in store.list()] == ["a"]
    assert fault_proxy.count("GET", "list-type=2", fault="fail") == 2


@pytest.mark.parametrize("client_attempts", [1, 2])
def test_s3_dropped_connection_during_upload_part(s3_bucket, fault_proxy, tmp_path, client_attempts):
    store = S3Store(s3_bucket, **{**FAST, "client_attempts": client_attempts}, **MULTIPART)
    src = tmp_path / "big.bin"
    src.write_bytes(data := os.urandom(11 * MiB))
    # The connection dies 1 MiB into the body of part 2.
    fault_proxy.drop_next(1, method="PUT", path_contains="partNumber=2", after_bytes=MiB)
    store.put_file("big.bin", src)
    assert fault_proxy.count(fault="drop") == 1
    if client_attempts == 1:  # the failed upload was aborted, then made again whole by our loop
        assert fault_proxy.count("POST", "uploads") == 2 and fault_proxy.count("DELETE", "uploadId=") == 1
    else:  # botocore sent part 2 again
        assert fault_proxy.count("POST", "uploads") == 1 and fault_proxy.count("PUT", "partNumber=2") == 2
    assert store.get_bytes("big.bin", expected_sha256=sha(data)) == data
    assert _s3_object(s3_bucket, "big.bin", PartNumber=1)["PartsCount"] == 3


def test_s3_permanent_500_fails_after_all_attempts(s3_bucket, fault_proxy):
    store = S3Store(s3_bucket, **{**FAST, "attempts": 4})
    fault_proxy.fail_always(500, method="PUT")
    with pytest.raises(StoreError, match="after 4 attempts") as err:
        store.put_bytes("step-1/model.pt", b"x")
    assert "InternalError" in str(err.value) and store.uri_for("step-1/model.pt") in str(err.value)
    assert fault_proxy.count("PUT") == 4


@pytest.mark.parametrize("fault", ["corrupt", "truncate"])
def test_s3_damaged_downloads_are_retried_and_verified(s3_bucket, fault_proxy, tmp_path, fault):
    store = S3Store(s3_bucket, **FAST)
    store.put_bytes("step-1/shard.pt", data := os.urandom(200_000))
    getattr(fault_proxy, f"{fault}_next")(1, method="GET", path_contains="step-1/shard.pt")
    store.get_file("step-1/shard.pt", tmp_path / "shard.pt")
    assert (tmp_path / "shard.pt").read_bytes() == data
    getattr(fault_proxy, f"{fault}_next")(1, method="GET", path_contains="step-1/shard.pt")
    assert store.get_bytes("step-1/shard.pt") == data
    assert fault_proxy.count(fault=fault) == 2
    assert fault_proxy.count("GET", "step-1/shard.pt") >= 4  # each damaged GET was followed by another


def test_s3_corrupt_multipart_download_is_caught_by_our_sha256(s3_bucket, fault_proxy, tmp_path):
    # S3's checksum of a multipart object is not of its content, so botocore cannot check it: our metadata does.
    store = S3Store(s3_bucket, **FAST, **MULTIPART)
    src = tmp_path / "big.bin"
    src.write_bytes(data := os.urandom(11 * MiB))
    store.put_file("big.bin", src)
    fault_proxy.corrupt_next(1, method="GET", path_contains="big.bin")
    store.get_file("big.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == data and fault_proxy.count(fault="corrupt") == 1


def test_s3_always_corrupt_download_fails_after_all_attempts(s3_bucket, fault_proxy, tmp_path):
    store = S3Store(s3_bucket, **FAST)
    store.put_bytes("k", os.urandom(1000))
    fault_proxy.corrupt_next(100, method="GET", path_contains="/k")
    with pytest.raises(StoreError, match="after 3 attempts") as err:
        store.get_file("k", tmp_path / "k")
    assert "checksum" in str(err.value).lower()  # botocore's check of S3's SHA256 (single-part object) fired
    assert not (tmp_path / "k").exists() and os.listdir(tmp_path) == []


def test_s3_access_denied_fails_at_once(s3_bucket, fault_proxy, tmp_path):
    store = S3Store(s3_bucket, **{**FAST, "client_attempts": 3})
    fault_proxy.fail_always(403)
    start = time.monotonic()
    with pytest.raises(StoreError, match="AccessDenied") as err:
        store.put_bytes("k", b"x")
    assert "check AWS_ENDPOINT_URL / credentials" in str(err.value) and fault_proxy.url in str(err.value)
    assert fault_proxy.requests == 1 and time.monotonic() - start < 2
    with pytest.raises(StoreError, match="403"):  # a HEAD has no error body: the status speaks
        store.get_file("k", tmp_path / "k")
    assert fault_proxy.requests == 2 and not (tmp_path / "k").exists()


def test_s3_missing_bucket_fails_at_once_everywhere(s3_server, tmp_path):
    store = S3Store("no-such-bucket-here", "p", **FAST)
    for call in (lambda: store.put_bytes("k", b"x"), lambda: store.get_bytes("k"), lambda: store.list(),
                 lambda: store.exists("k"), lambda: store.get_file("k", tmp_path / "k")):
        with pytest.raises(StoreError, match="bucket 'no-such-bucket-here' does not exist") as err:
            call()
        assert not isinstance(err.value, ObjectNotFound) and s3_server in str(err.value)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_s3_unreachable_endpoint_fails_within_seconds(s3_server, monkeypatch):
    endpoint = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    start = time.monotonic()
    with pytest.raises(StoreError, match="after 3 attempts") as err:
        S3Store("bucket", **FAST).put_bytes("k", b"x")
    assert time.monotonic() - start < 5
    assert endpoint in str(err.value) and "AWS_ENDPOINT_URL" in str(err.value)


def test_s3_hung_endpoint_times_out(s3_server, monkeypatch):
    # Accepts connections (the kernel does, on listen) but never answers.
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{hung.getsockname()[1]}")
        start = time.monotonic()
        with pytest.raises(StoreError, match="after 2 attempts"):
            S3Store("bucket", **{**FAST, "attempts": 2, "read_timeout": 0.5}).get_bytes("k")
        assert time.monotonic() - start < 5


def test_s3_errors_never_carry_the_secret_key(s3_bucket, fault_proxy, monkeypatch, tmp_path):
    secret = "SeCrEt-do-not-leak-7f3a9c"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDLEAKTEST")  # a new client is made with these credentials
    store = S3Store(s3_bucket, **FAST)
    errors: list[StoreError] = []

    def collect(call) -> None:
        with pytest.raises(StoreError) as err:
            call()
        errors.append(err.value)

    collect(lambda: store.get_bytes("missing"))
    collect(lambda: store.get_file("missing", tmp_path / "m", expected_sha256="0" * 64))
    collect(lambda: S3Store("no-such-bucket-here", **FAST).list())
    fault_proxy.fail_always(403)
    collect(lambda: store.put_bytes("k", b"x"))
    fault_proxy.clear()
    fault_proxy.fail_always(503)
    collect(lambda: store.put_bytes("k", b"x"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")
    collect(lambda: store.list())
    assert len(errors) == 6
    for e in errors:
        chain = [e, e.__cause__, e.__context__]
        assert not any(secret in str(x) or secret in repr(x) for x in chain if x is not None), str(e)
