"""The commit protocol on a local directory and on S3 (moto's server on loopback, behind a fault-injecting proxy):
manifest last, newest complete wins, verification with fallback, retention, async upload."""

import json
import time
from pathlib import Path

import pytest

from trainer.checkpoint import MANIFEST, CheckpointError, CheckpointManager, Manifest, Ranks
from trainer.stores import open_store


@pytest.fixture(params=["local", "s3"])
def store_uri(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "checkpoints")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/runs/a/checkpoints"


def manager_for(uri, tmp_path, **kwargs):
    return CheckpointManager(open_store(uri, **({"base_delay": 0.01} if uri.startswith("s3") else {})),
                             tmp_path / "staging", Ranks(), **kwargs)


def writer(step: int, size: int = 1000):
    def write(directory: Path) -> None:
        (directory / "model.bin").write_bytes(bytes([step % 256]) * size)
        (directory / "sub").mkdir()
        (directory / "sub" / "run.json").write_text(json.dumps({"step": step}))
    return write


def save(manager, step, **kwargs):
    manager.save(step, writer(step, **kwargs), Manifest(step, "single", "torch", 1, "hash"))
    return manager.wait()


def test_a_checkpoint_is_its_files_plus_a_manifest_written_last(store_uri, tmp_path):
    manager = manager_for(store_uri, tmp_path)
    result = save(manager, 10)
    assert result.committed and result.error is None and 0 < result.blocked_seconds <= result.total_seconds
    assert manager.steps() == [10]
    manifest = manager.verify(10)
    assert set(manifest.files) == {"model.bin", "sub/run.json"} and manifest.files["model.bin"]["size"] == 1000
    import hashlib
    assert manifest.files["model.bin"]["sha256"] == hashlib.sha256(bytes([10]) * 1000).hexdigest()
    restored, directory = manager.restore(10, tmp_path / "cache")
    assert (directory / "model.bin").read_bytes() == bytes([10]) * 1000
    assert json.loads((directory / "sub" / "run.json").read_text()) == {"step": 10}
    assert not any((tmp_path / "staging").iterdir())  # staging cleared once uploaded


def test_a_prefix_without_manifest_is_never_resumed(store_uri, tmp_path):
    manager = manager_for(store_uri, tmp_path)
    save(manager, 5)
    save(manager, 10)
    manager.store.delete([f"step-00000010/{MANIFEST}"])  # e.g. a crash before the manifest went up
    assert manager.steps() == [5]
    manifest, _ = manager.restore_latest(tmp_path / "cache")
    assert manifest.step == 5


def test_a_corrupted_newest_checkpoint_falls_back_to_the_previous_with_a_warning(store_uri, tmp_path):
    manager = manager_for(store_uri, tmp_path, keep=3)
    save(manager, 5)
    save(manager, 10)
    manager.store.put_bytes("step-00000010/model.bin", b"\x00" * 1000)  # same size, other content
    with pytest.raises(CheckpointError, match="sha256"):
        manager.verify(10)
    with pytest.warns(UserWarning, match=r"skipping checkpoint .*step-00000010"):
        manifest, directory = manager.restore_latest(tmp_path / "cache")
    assert manifest.step == 5 and (directory / "model.bin").read_bytes() == bytes([5]) * 1000
    manager.store.put_bytes("step-00000005/model.bin", b"short")  # now both are broken: refuse to start over
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match=r"steps \[5, 10\] but none verifies"):
        manager.restore_latest(tmp_path / "cache")


def test_retention_keeps_the_last_n_and_every_mth_and_never_the_newest(store_uri, tmp_path):
    manager = manager_for(store_uri, tmp_path, keep=2, keep_every=20)
    for step in (5, 10, 15, 20, 25, 30, 35):
        save(manager, step)
    assert manager.steps() == [20, 30, 35]
    # Checkpoints of a later step left in the same place (e.g. an earlier, longer run): a new save at a smaller step
    # prunes only below itself.
    save(manager, 12)
    assert manager.steps() == [12, 20, 30, 35]


def test_an_interrupted_deletion_leaves_nothing_that_looks_complete(store_uri, tmp_path):
    manager = manager_for(store_uri, tmp_path, keep=2)
    save(manager, 5)
    save(manager, 10)
    # Retention deletes the manifest first; a crash right after leaves the files without it.
    manager.store.delete([f"step-00000005/{MANIFEST}"])
    assert manager.steps() == [10]
    save(manager, 15)  # the next retention pass removes the leftovers
    assert [i.key for i in manager.store.list("step-00000005")] == []
    assert manager.steps() == [10, 15]


def test_saving_returns_before_the_upload_and_the_next_save_waits(s3_bucket, fault_proxy, tmp_path):
    manager = manager_for(f"s3://{s3_bucket}/ck", tmp_path)
    fault_proxy.delay_next(2, seconds=1.0, method="PUT", path_contains="model.bin")
    started = time.perf_counter()
    blocked = manager.save(1, writer(1), Manifest(1, "single", "torch", 1, "h"))
    returned = time.perf_counter() - started
    assert returned < 0.5 and blocked < 0.5  # training goes on while the upload is delayed
    assert manager.steps() == []  # not committed yet: no manifest
    manager.save(2, writer(2), Manifest(2, "single", "torch", 1, "h"))  # waits for step 1 first
    assert time.perf_counter() - started >= 1.0 and manager.steps() in ([1], [1, 2])
    second = manager.wait()
    assert second.committed and second.total_seconds >= 1.0 and second.blocked_seconds < 0.5
    assert manager.steps() == [1, 2]


def test_transient_s3_errors_during_upload_are_retried(s3_bucket, fault_proxy, tmp_path):
    manager = manager_for(f"s3://{s3_bucket}/ck", tmp_path)
    fault_proxy.fail_next(2, status=503, method="PUT", path_contains="model.bin")
    fault_proxy.drop_next(1, method="PUT", path_contains="run.json")
    result = save(manager, 3)
    assert result.committed and manager.steps() == [3]
    assert fault_proxy.faults == 3
    manager.verify(3)


def test_a_failed_upload_publishes_no_manifest_and_keeps_the_previous_checkpoint(s3_bucket, fault_proxy, tmp_path):
    manager = CheckpointManager(open_store(f"s3://{s3_bucket}/ck", attempts=2, base_delay=0.01, client_attempts=1),
                                tmp_path / "staging", Ranks())
    save(manager, 1)
    fault_proxy.fail_always(500, method="PUT", path_contains="step-00000002/model.bin")
    result = save(manager, 2)
    assert not result.committed and "not committed" in result.error and "model.bin" in result.error
    fault_proxy.clear()
    assert manager.steps() == [1]
    assert not manager.store.exists(f"step-00000002/{MANIFEST}")
    manager.verify(1)


def test_manifest_records_what_a_reader_needs(store_uri, tmp_path):
    manager = manager_for(store_uri, tmp_path)
    manager.save(7, writer(7), Manifest(7, "fsdp", "dcp", 4, "abc123"))
    manager.wait()
    m = manager.manifest(7)
    assert (m.step, m.strategy, m.checkpoint_format, m.world_size, m.config_hash) == (7, "fsdp", "dcp", 4, "abc123")
    manager.store.put_bytes(f"step-00000007/{MANIFEST}", b"{not json")
    with pytest.raises(CheckpointError, match="not a readable checkpoint manifest"):
        manager.manifest(7)
