"""MDSLoader (data.format=mds over mosaicml-streaming): exact resumption on 1 and 2 ranks with 0-2 workers, every
sample once per epoch, heldout exactly once, S3 = local, and clear errors for bad data and bad places.

Every loader gets a fresh cache directory; 2-rank cases run as 2 real processes (streaming coordinates the ranks
of a machine through named shared memory), this file being their entry point (see ``_rank_main``)."""

from __future__ import annotations

import io
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline import build_loader, dataset_info
from data_pipeline.codecs import CorruptSampleError, encode_image
from data_pipeline.config import DataConfig
from data_pipeline.manifest import MANIFEST_NAME, Manifest, ShardInfo, sha256_file
from data_pipeline.mds_loader import MDSLoader
from data_pipeline.s3 import clear_s3_clients
from data_pipeline.sources import open_source
from data_pipeline.storage import DataSourceError
from data_pipeline.writer import write_dataset

REPO = Path(__file__).resolve().parents[1]
N_TRAIN, N_HELDOUT = 1617, 180
SHARD_SIZE = 4000  # bytes: 69 train shards, 8 heldout shards


# -- fixtures and helpers ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_mds(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mds") / "digits"
    write_dataset(open_source("digits"), str(root), "mds", shard_size=SHARD_SIZE, encoding="png")
    return root


@pytest.fixture(scope="module")
def digits_keys() -> dict[str, list[str]]:
    source = open_source("digits")
    return {split: [key for key, _, _ in samples()] for split, samples in source.splits.items()}


def _cfg(uri, tmp_path: Path | None, **kw) -> DataConfig:
    """A fresh cache directory per loader (tmp_path given) or the loader's own temporary one (None)."""
    cache = str(tmp_path / f"cache-{uuid.uuid4().hex[:8]}") if tmp_path is not None else ""
    return DataConfig(format="mds", uri=str(uri), cache_dir=cache, **kw)


def _take(loader, k: int) -> list[tuple]:
    gen = iter(loader)
    out = list(itertools.islice(gen, k))
    gen.close()  # ends the epoch's DataLoader now (workers, streaming threads), as a stopped run would
    return out


def _flat(batches) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    keys = [k for _, _, ks in batches for k in ks]
    return keys, torch.cat([y for _, y, _ in batches]), torch.cat([x for x, _, _ in batches])


def _roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# -- exact resumption, one rank ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("save_workers,resume_workers,k", [(0, 0, 17), (1, 1, 50), (2, 2, 23), (2, 0, 52)])
def test_resume_continues_exactly_one_rank(digits_mds, tmp_path, save_workers, resume_workers, k):
    """Interrupt after k batches (mid-epoch, at the epoch boundary, in the next epoch), save, resume in a new loader
    (and with another worker count): the concatenation is the uninterrupted stream, keys, labels and pixels."""
    batch = 32
    with MDSLoader(_cfg(digits_mds, tmp_path, num_workers=save_workers), "train", batch, seed=11,
                   with_keys=True) as ref_loader:
        bpe = ref_loader.batches_per_epoch
        assert bpe == N_TRAIN // batch == 50
        total = bpe + 6  # across the epoch boundary
        ref = _take(ref_loader, total)
    with MDSLoader(_cfg(digits_mds, tmp_path, num_workers=save_workers), "train", batch, seed=11,
                   with_keys=True) as first:
        head = _take(first, k)
        state = _roundtrip(first.state_dict())
    epoch = (k - 1) // bpe  # at a boundary the state is "epoch e, all its batches" (the roll-over is pending)
    assert state["epoch"] == epoch and state["batches_in_epoch"] == k - epoch * bpe
    assert state["streaming"]["sample_in_epoch"] == state["batches_in_epoch"] * batch
    with MDSLoader(_cfg(digits_mds, tmp_path, num_workers=resume_workers), "train", batch, seed=11,
                   with_keys=True) as second:
        second.load_state_dict(state)
        tail = _take(second, total - k)
    ref_keys, ref_labels, ref_images = _flat(ref)
    keys, labels, images = _flat(head + tail)
    assert keys == ref_keys
    assert torch.equal(labels, ref_labels) and torch.equal(images, ref_images)
    assert all(x.shape == (batch, 1, 8, 8) and x.dtype == torch.float32 for x, _, _ in ref)


def test_same_seed_same_order_epochs_differ_every_sample_once(digits_mds, digits_keys, tmp_path):
    batch = 25
    with MDSLoader(_cfg(digits_mds, tmp_path), "train", batch, seed=5, with_keys=True) as a:
        bpe = a.batches_per_epoch
        assert bpe == N_TRAIN // batch and a.samples_per_epoch == bpe * batch and a.num_samples == N_TRAIN
        gen = iter(a)
        first = list(itertools.islice(gen, 10))
        gen.close()  # a stopped loop ...
        assert a.epoch == 0 and a.state_dict()["batches_in_epoch"] == 10
        rest = _take(a, 2 * bpe - 10)  # ... and a new loop over the same loader continue where it stopped
        assert a.epoch == 1
    keys, labels, images = _flat(first + rest)
    epoch0, epoch1 = keys[:bpe * batch], keys[bpe * batch:]
    train = set(digits_keys["train"])
    for epoch in (epoch0, epoch1):
        assert len(set(epoch)) == len(epoch) == bpe * batch  # at most once; the 17 left out are the order's tail
        assert set(epoch) <= train
    assert epoch0 != epoch1 and set(epoch0) != set(epoch1)  # another order, another tail left out
    assert torch.all((images >= -1) & (images <= 1)) and labels.dtype == torch.int64
    # pixels and labels are the source's
    source = {key: (image, label) for key, image, label in open_source("digits").splits["train"]()}
    for i in range(0, len(keys), 97):
        image, label = source[keys[i]]
        assert int(labels[i]) == label
        assert np.array_equal(torch.round((images[i] + 1) * 127.5).to(torch.uint8).numpy(), image)

    with MDSLoader(_cfg(digits_mds, tmp_path), "train", batch, seed=5, with_keys=True) as same:
        assert _flat(_take(same, 3))[0] == keys[:3 * batch]
    with MDSLoader(_cfg(digits_mds, tmp_path), "train", batch, seed=6, with_keys=True) as other:
        assert _flat(_take(other, 3))[0] != keys[:3 * batch]


def test_steps_holding_streamings_repeats_are_not_yielded(digits_mds, tmp_path):
    """With 4 canonical nodes, 1617 samples make streaming repeat a sample at position 1616 of each epoch's order;
    batches of 49 would fill 33 steps = 1617 positions. The loader stops after 32 full steps: no repeats."""
    with MDSLoader(_cfg(digits_mds, tmp_path, num_canonical_nodes=4), "train", 49, seed=0, with_keys=True) as loader:
        assert loader.batches_per_epoch == 32
        keys = _flat(_take(loader, 64))[0]
    for epoch in (keys[:32 * 49], keys[32 * 49:]):
        assert len(set(epoch)) == len(epoch) == 32 * 49


def test_random_flip_depends_on_seed_epoch_key_only(digits_mds, tmp_path):
    cfg = _cfg(digits_mds, tmp_path, random_flip=True)
    with MDSLoader(cfg, "train", 50, seed=1, with_keys=True) as flipped, \
            MDSLoader(_cfg(digits_mds, tmp_path), "train", 50, seed=1, with_keys=True) as plain:
        a, b = _take(flipped, 2), _take(plain, 2)
    from data_pipeline.transforms import flip_decision

    for (xa, _, ka), (xb, _, kb) in zip(a, b):
        assert ka == kb
        for i, key in enumerate(ka):
            expected = torch.flip(xb[i], dims=[-1]) if flip_decision(1, 0, key) else xb[i]
            assert torch.equal(xa[i], expected)


# -- heldout -----------------------------------------------------------------------------------------------------------
def test_heldout_natural_order_once_per_loop_and_resume(digits_mds, digits_keys, tmp_path):
    cfg = _cfg(digits_mds, tmp_path, num_workers=1)
    with MDSLoader(cfg, "heldout", 32, seed=0, with_keys=True) as loader:
        assert loader.batches_per_epoch == 6
        batches = list(loader)
        assert [len(k) for _, _, k in batches] == [32] * 5 + [20]
        assert _flat(batches)[0] == digits_keys["heldout"]  # the order written, every sample once
        assert _flat(list(loader))[0] == digits_keys["heldout"] and loader.epoch == 1  # the next loop: next epoch
    with MDSLoader(_cfg(digits_mds, tmp_path), "heldout", 32, seed=0) as first:
        head = _take(first, 2)
        state = _roundtrip(first.state_dict())
        assert all(len(b) == 2 for b in head)  # (images, labels) without with_keys
    with MDSLoader(_cfg(digits_mds, tmp_path), "heldout", 32, seed=0, with_keys=True) as second:
        second.load_state_dict(state)
        assert _flat(list(second))[0] == digits_keys["heldout"][64:]


# -- two ranks: real processes -----------------------------------------------------------------------------------------
def _rank_main(rank: int, uri: str, out: str) -> None:
    """One rank of the 2-rank test (2 loader workers): an uninterrupted run, an interrupted and resumed one, and
    the heldout split; writes what it read as JSON."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    cfg = DataConfig(format="mds", uri=uri, num_workers=2)  # cache_dir "": local rank 0's temp dir, shared
    batch, k = 16, 9

    def loader(split):
        return MDSLoader(cfg, split, batch, seed=3, rank=rank, world_size=2, with_keys=True)

    def record(batches):
        keys, labels, images = _flat(batches)
        return {"keys": keys, "labels": labels.tolist(), "pixels": images.sum(dim=(1, 2, 3)).tolist()}

    with loader("train") as full:
        bpe = full.batches_per_epoch
        total = bpe + 4
        ref = _take(full, total)
    with loader("train") as first:
        head = _take(first, k)
        state = _roundtrip(first.state_dict())
    with loader("train") as second:
        second.load_state_dict(state)
        tail = _take(second, total - k)
    with loader("heldout") as heldout:
        held = _flat(list(heldout))[0]
        cache = heldout.cache_dir
    dist.barrier()  # the cache is local rank 0's: it goes when that process ends
    dist.destroy_process_group()
    Path(out).write_text(json.dumps({"bpe": bpe, "ref": record(ref), "resumed": record(head + tail),
                                     "heldout": held, "cache": cache}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_two_workers_resume_exactly_and_read_each_sample_once(digits_mds, digits_keys, tmp_path):
    port = _free_port()
    procs, outs = [], []
    for rank in range(2):
        out = tmp_path / f"rank{rank}.json"
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, __file__, str(rank), str(digits_mds), str(out)], env=env,
                                      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        outs.append(out)
    logs = []
    for proc in procs:
        try:
            logs.append(proc.communicate(timeout=120)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, log[-4000:]
    r0, r1 = (json.loads(o.read_text()) for o in outs)

    batch, bpe = 16, r0["bpe"]
    assert bpe == r1["bpe"] == N_TRAIN // (2 * batch)
    for r in (r0, r1):
        assert r["resumed"] == r["ref"]  # keys, labels and pixel sums, across the epoch boundary
    # epoch 0: the two ranks' samples are disjoint and none repeats (streaming's padding is never yielded)
    epoch0 = r0["ref"]["keys"][:bpe * batch] + r1["ref"]["keys"][:bpe * batch]
    assert len(set(epoch0)) == len(epoch0) == 2 * bpe * batch and set(epoch0) <= set(digits_keys["train"])
    assert r0["ref"]["keys"][bpe * batch:] != r0["ref"]["keys"][:4 * batch]  # epoch 1 is another order
    # heldout: every key exactly once across the ranks, rank r reads positions r, r+2, ...
    assert r0["heldout"] == digits_keys["heldout"][0::2] and r1["heldout"] == digits_keys["heldout"][1::2]
    assert r0["cache"] == r1["cache"]  # one cache on the machine, made by local rank 0


# -- S3 ----------------------------------------------------------------------------------------------------------------
def test_s3_reads_the_same_samples_as_local(digits_mds, s3_bucket, tmp_path):
    uri = f"s3://{s3_bucket}/digits"
    write_dataset(open_source("digits"), uri, "mds", shard_size=SHARD_SIZE, encoding="png")
    for split, batches in (("train", 8), ("heldout", 100)):
        with MDSLoader(_cfg(uri, tmp_path, num_workers=1), split, 64, seed=2, with_keys=True) as remote, \
                MDSLoader(_cfg(digits_mds, tmp_path), split, 64, seed=2, with_keys=True) as local:
            a, b = _flat(_take(remote, batches)), _flat(_take(local, batches))
            assert a[0] == b[0] and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
            if split == "train":  # the same data moved to S3: a local run's position resumes there
                remote.load_state_dict(_roundtrip(local.state_dict()))
    assert dataset_info(_cfg(uri, None)) == ((1, 8, 8), 10)


# -- bad input ---------------------------------------------------------------------------------------------------------
def _write_mds(directory: Path, split: str, rows: list[tuple[str, bytes, int]], shape=(1, 8, 8)) -> None:
    """An MDS split written directly with streaming's MDSWriter (any bytes as images), plus our manifest."""
    from streaming import MDSWriter

    out = directory / split
    with MDSWriter(out=str(out), columns={"key": "str", "image": "bytes", "label": "int"}, size_limit=1500,
                   hashes=["sha1"]) as writer:
        for key, data, label in rows:
            writer.write({"key": key, "image": data, "label": label})
    index = json.loads((out / "index.json").read_text())
    shards = [ShardInfo(s["raw_data"]["basename"], s["samples"], s["raw_data"]["bytes"],
                        sha256_file(out / s["raw_data"]["basename"])) for s in index["shards"]]
    manifest = Manifest(format="mds", split=split, num_samples=len(rows), num_classes=10, image_shape=list(shape),
                        encoding="png", source="test", shards=shards)
    (out / MANIFEST_NAME).write_text(manifest.to_json())


@pytest.fixture(scope="module")
def corrupt_mds(tmp_path_factory) -> tuple[Path, list[str]]:
    """60 digits per split in several shards; 3 of them with garbage instead of a PNG."""
    root = tmp_path_factory.mktemp("corrupt")
    samples = list(itertools.islice(open_source("digits").splits["train"](), 60))
    bad = {7, 31, 52}
    rows = [(key, b"\x89PNG garbage" + bytes(range(40)) if i in bad else encode_image(image, "png"), label)
            for i, (key, image, label) in enumerate(samples)]
    for split in ("train", "heldout"):
        _write_mds(root, split, rows)
    return root, [samples[i][0] for i in sorted(bad)]


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_image_raises_naming_shard_and_key(corrupt_mds, tmp_path, workers):
    root, bad = corrupt_mds
    with MDSLoader(_cfg(root, tmp_path, num_workers=workers), "heldout", 4, seed=0) as loader:
        with pytest.raises(CorruptSampleError) as info:
            list(loader)
    assert info.value.key == bad[0] and info.value.shard.startswith("shard.") and info.value.shard.endswith(".mds")
    assert bad[0] in str(info.value) and info.value.shard in str(info.value)


def test_skip_corrupt_leaves_out_and_counts(corrupt_mds, tmp_path):
    root, bad = corrupt_mds
    with MDSLoader(_cfg(root, tmp_path, skip_corrupt=True), "heldout", 4, seed=0, with_keys=True) as loader:
        keys = _flat(list(loader))[0]
        assert loader.skipped_corrupt == 3 and len(keys) == 57 and not set(keys) & set(bad)
    with MDSLoader(_cfg(root, tmp_path, skip_corrupt=True, num_workers=1), "train", 4, seed=0,
                   with_keys=True) as loader:
        assert loader.batches_per_epoch == 15  # all 60 samples are read each epoch
        batches = _take(loader, 15)
        keys = _flat(batches)[0]
        assert loader.skipped_corrupt == 3 and len(set(keys)) == len(keys) == 57 and not set(keys) & set(bad)
        assert len(batches) == 15 and sum(len(k) for _, _, k in batches) == 57  # 3 batches of 3, positions kept
        assert _roundtrip(loader.state_dict())["skipped_corrupt"] == 3


@pytest.fixture
def digits_copy(digits_mds, tmp_path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(digits_mds, copy)
    return copy


def test_missing_files_are_named(digits_copy, tmp_path):
    (digits_copy / "train" / "shard.00005.mds").unlink()
    with pytest.raises(DataSourceError, match=r"missing: .*train/shard\.00005\.mds"):
        MDSLoader(_cfg(digits_copy, tmp_path), "train", 8, seed=0)
    (digits_copy / "heldout" / "index.json").unlink()
    with pytest.raises(DataSourceError, match=r"heldout/index\.json does not exist"):
        MDSLoader(_cfg(digits_copy, tmp_path), "heldout", 8, seed=0)
    with pytest.raises(DataSourceError, match=r"nowhere/train/manifest\.json does not exist"):
        MDSLoader(_cfg(tmp_path / "nowhere", tmp_path), "train", 8, seed=0)
    with pytest.raises(ValueError, match="data.uri is empty"):
        MDSLoader(DataConfig(format="mds"), "train", 8, seed=0)


def test_truncated_shard_and_index_manifest_disagreement(digits_copy, tmp_path):
    shard = digits_copy / "train" / "shard.00002.mds"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"shard\.00002\.mds has 100 bytes"):
        MDSLoader(_cfg(digits_copy, tmp_path), "train", 8, seed=0)
    manifest = json.loads((digits_copy / "heldout" / MANIFEST_NAME).read_text())
    manifest["shards"][0]["num_samples"] -= 1
    manifest["shards"][1]["num_samples"] += 1
    (digits_copy / "heldout" / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"manifest\.json and .*index\.json disagree"):
        MDSLoader(_cfg(digits_copy, tmp_path), "heldout", 8, seed=0)


def test_shard_vanishing_after_start_is_an_error_not_a_short_epoch(digits_copy, tmp_path):
    with MDSLoader(_cfg(digits_copy, tmp_path), "train", 32, seed=0) as train, \
            MDSLoader(_cfg(digits_copy, tmp_path), "heldout", 32, seed=0) as heldout:
        for name in ("train/shard.00040.mds", "heldout/shard.00004.mds"):
            (digits_copy / name).unlink()
        with pytest.raises(DataSourceError, match=r"shard\.00040\.mds"):
            _take(train, train.batches_per_epoch)
        with pytest.raises(DataSourceError, match=r"heldout/shard\.00004\.mds"):
            list(heldout)


def test_shape_mismatch_with_manifest(digits_copy, tmp_path):
    path = digits_copy / "heldout" / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest["image_shape"] = [3, 8, 8]
    path.write_text(json.dumps(manifest))
    with MDSLoader(_cfg(digits_copy, tmp_path), "heldout", 16, seed=0) as loader:
        with pytest.raises(CorruptSampleError, match=r"manifest says \(3, 8, 8\)"):
            list(loader)
    with MDSLoader(_cfg(digits_copy, tmp_path, skip_corrupt=True), "heldout", 16, seed=0) as loader:
        with pytest.raises(ValueError, match="every sample .* was corrupt"):
            list(loader)


def test_unreachable_endpoint(monkeypatch, tmp_path):
    for name in ("AWS_ENDPOINT_URL", "S3_ENDPOINT_URL"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # loopback, nothing listens on the discard port
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    clear_s3_clients()  # boto3 clients read the endpoint when they are made
    try:
        with pytest.raises(DataSourceError, match="cannot reach the S3 endpoint"):
            MDSLoader(_cfg("s3://bucket/digits", tmp_path), "train", 8, seed=0)
        monkeypatch.setenv("S3_ENDPOINT_URL", "http://127.0.0.1:10")
        with pytest.raises(ValueError, match="S3_ENDPOINT_URL=.* differs"):
            MDSLoader(_cfg("s3://bucket/digits", tmp_path), "train", 8, seed=0)
    finally:
        clear_s3_clients()


# -- setup errors ------------------------------------------------------------------------------------------------------
def test_state_from_another_setup_is_refused(digits_mds, corrupt_mds, tmp_path):
    with MDSLoader(_cfg(digits_mds, tmp_path), "train", 32, seed=0) as a:
        _take(a, 3)
        state = a.state_dict()
    with MDSLoader(_cfg(digits_mds, tmp_path), "train", 16, seed=0) as b:
        with pytest.raises(ValueError, match="batch_size: saved 32, now 16"):
            b.load_state_dict(state)
    with MDSLoader(_cfg(digits_mds, tmp_path), "train", 32, seed=1) as c:
        with pytest.raises(ValueError, match="seed: saved 0, now 1"):
            c.load_state_dict(state)
        with pytest.raises(ValueError, match="out of range"):
            c.load_state_dict({**state, "seed": 1, "batches_in_epoch": 51})
    with MDSLoader(_cfg(digits_mds, tmp_path, num_canonical_nodes=2), "train", 32, seed=0) as d:
        with pytest.raises(ValueError, match="num_canonical_nodes: saved 1, now 2"):
            d.load_state_dict(state)
    with MDSLoader(_cfg(corrupt_mds[0], tmp_path), "train", 32, seed=0) as e:
        with pytest.raises(ValueError, match="dataset: saved '[0-9a-f]+', now '[0-9a-f]+'"):
            e.load_state_dict(state)


def test_rank_arguments_must_agree_with_the_environment(digits_mds, tmp_path, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="torch.distributed initialised"):
        MDSLoader(_cfg(digits_mds, tmp_path), "train", 8, seed=0, rank=1, world_size=2)
    assert "RANK" not in os.environ  # a refused loader leaves the environment alone
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="disagrees with the environment RANK=1 WORLD_SIZE=2"):
        MDSLoader(_cfg(digits_mds, tmp_path), "train", 8, seed=0)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE is not"):
        MDSLoader(_cfg(digits_mds, tmp_path), "train", 8, seed=0)


def test_stale_shared_memory_is_removed_live_is_kept():
    from multiprocessing.shared_memory import SharedMemory

    from data_pipeline import mds_streaming

    stale = Path("/dev/shm/999990_locals")
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm")
    stale.write_bytes(b"\0" * 8)  # what a killed run leaves: a segment no process maps
    live = SharedMemory("999991_locals", create=True, size=8)
    try:
        mds_streaming._SHM_CLEANED = False
        assert mds_streaming.clean_stale_shared_memory() >= 1
        assert not stale.exists() and Path("/dev/shm/999991_locals").exists()
        assert mds_streaming.clean_stale_shared_memory() == 0  # once per process
    finally:
        stale.unlink(missing_ok=True)
        live.close()
        live.unlink()


def test_registry_hooks(digits_mds, tmp_path):
    assert dataset_info(_cfg(digits_mds, None, resize=16, crop=12)) == ((1, 12, 12), 10)
    with build_loader(_cfg(digits_mds, None), "heldout", 64, seed=0) as loader:
        assert isinstance(loader, MDSLoader) and loader.batches_per_epoch == 3
        tmp = loader.cache_dir
        x, y = next(iter(loader))
        assert x.shape == (64, 1, 8, 8) and y.shape == (64,)
    assert not Path(tmp).exists()  # the temporary cache goes with the loader


if __name__ == "__main__":  # one rank of test_two_ranks_...: python tests/test_mds_loader.py RANK URI OUT
    _rank_main(int(sys.argv[1]), sys.argv[2], sys.argv[3])


@pytest.mark.parametrize("workers", [0, 1])
def test_reading_leaves_the_global_rng_alone(digits_mds, tmp_path, workers):
    """The trainer's noise comes from the global RNG; a loader starting its epochs must not draw from it."""
    with MDSLoader(_cfg(digits_mds, tmp_path, num_workers=workers), "train", 256, seed=0) as loader:
        torch.manual_seed(7)
        expected = torch.rand(3)
        torch.manual_seed(7)
        batches = iter(loader)
        for _ in range(loader.batches_per_epoch + 1):  # into the next epoch
            next(batches)
        assert torch.equal(torch.rand(3), expected)
