"""WebDatasetLoader: the global step is the same samples on any ranks / micro-batch / workers, exact and elastic
resume, heldout coverage, what is refused, S3 (moto on loopback) and bad input."""

import io
import itertools
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline import dataset_info
from data_pipeline.batch import Batch
from data_pipeline.codecs import CorruptSampleError
from data_pipeline.config import DataConfig
from data_pipeline.sources import Source, open_source
from data_pipeline.storage import DataSourceError
from data_pipeline.transforms import flip_decision
from data_pipeline.webdataset_loader import WebDatasetLoader
from data_pipeline.writer import write_dataset

REPO = Path(__file__).resolve().parents[1]
N_TRAIN, N_HELDOUT = 123, 31  # 31 train shards (4 samples, the last 3), 8 heldout shards (4, the last 3)
N_SHARDS = 31
SHARD_SIZE = 10600


def _tiny_source(n_train: int = N_TRAIN, n_heldout: int = N_HELDOUT) -> Source:
    src = open_source("digits")
    return Source(src.name, src.num_classes, src.image_shape,
                  {"train": lambda: itertools.islice(src.splits["train"](), n_train),
                   "heldout": lambda: itertools.islice(src.splits["heldout"](), n_heldout)},
                  {"train": n_train, "heldout": n_heldout})


def _source_samples(split: str) -> list:
    """(key, uint8 image, label) in source (= manifest) order: the sample of index i is the i-th."""
    return list(_tiny_source().splits[split]())


def _write(out) -> str:
    write_dataset(_tiny_source(), str(out), "webdataset", shard_size=SHARD_SIZE, encoding="png")
    return str(out)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return _write(tmp_path_factory.mktemp("wds") / "data")


@pytest.fixture
def fresh_dir(tmp_path) -> str:
    """A dataset of our own, to damage."""
    return _write(tmp_path / "data")


def _cfg(uri: str, **kw) -> DataConfig:
    args = dict(format="webdataset", uri=uri, num_workers=0, shuffle_buffer=20)
    args.update(kw)
    return DataConfig(**args)


def _loader(uri, split="train", batch_size=4, *, seed=3, rank=0, world_size=1, global_batch=None,
            **kw) -> WebDatasetLoader:
    return WebDatasetLoader(_cfg(uri, **kw), split, batch_size, seed=seed, rank=rank, world_size=world_size,
                            global_batch=global_batch)


def _take(loader, k=None) -> list:
    """k batches (all of one heldout epoch for None), the iterator closed afterwards (workers shut down)."""
    it = iter(loader)
    try:
        return list(itertools.islice(it, k)) if k is not None else list(it)
    finally:
        it.close()


def _indices(batches) -> list:
    return [i for b in batches for i in b.indices.tolist()]


def _same(a, b):
    assert _indices(a) == _indices(b)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x.images, y.images) and torch.equal(x.labels, y.labels)


def _to_u8(x: torch.Tensor) -> np.ndarray:
    return torch.round((x + 1) * 127.5).to(torch.uint8).numpy()


def _global_steps(uri, world_size, batch_size, global_batch, steps, *, state=None, **kw) -> list[dict]:
    """The first ``steps`` global steps of a run on ``world_size`` ranks (one loader per rank, in this process):
    per step, index → (image, label) over all ranks' micro-batches; optionally every rank resumed from ``state``."""
    loaders = [_loader(uri, batch_size=batch_size, rank=r, world_size=world_size, global_batch=global_batch, **kw)
               for r in range(world_size)]
    for loader in loaders:
        if state is not None:
            loader.load_state_dict(state)
    micro = global_batch // (world_size * batch_size)
    per_rank = [_take(loader, steps * micro) for loader in loaders]
    out = []
    for k in range(steps):
        step = {}
        for batches in per_rank:
            for b in batches[k * micro:(k + 1) * micro]:
                assert isinstance(b, Batch) and len(b.indices) == batch_size and b.indices.dtype == torch.int64
                for i, x, y in zip(b.indices.tolist(), b.images, b.labels.tolist()):
                    assert i not in step  # a sample at most once in a step, across ranks and micro-batches
                    step[i] = (x, y)
        assert len(step) == global_batch
        out.append(step)
    return out


def _same_steps(a: list[dict], b: list[dict]) -> None:
    assert [sorted(s) for s in a] == [sorted(s) for s in b]
    for sa, sb in zip(a, b):
        for i in sa:
            assert torch.equal(sa[i][0], sb[i][0]) and sa[i][1] == sb[i][1]


# -- elastic: the global step ----------------------------------------------------------------------------------------
G, STREAMS = 16, 8  # 8 streams of 15 samples: 2 samples of each a step, 7 steps an epoch


@pytest.mark.parametrize("streams", [0, STREAMS])
def test_a_global_step_is_the_same_samples_for_any_ranks_micro_batch_and_workers(data_dir, streams):
    kw = dict(streams=streams, random_flip=True)
    s = _loader(data_dir, batch_size=G, global_batch=G, **kw).streams
    assert s == (4 if streams == 0 else streams)  # default: largest divisor of 16 that is <= 31 shards // 4
    k = (N_TRAIN // s) // (G // s)  # the shortest stream holds N // S samples, G / S of them a step
    assert _loader(data_dir, batch_size=G, global_batch=G, **kw).batches_per_epoch == k
    reference = _global_steps(data_dir, 1, G, G, k + 2, **kw)
    epoch0 = [i for step in reference[:k] for i in step]
    assert len(set(epoch0)) == len(epoch0) == k * G and set(epoch0) <= set(range(N_TRAIN))  # no repeat in an epoch
    assert sorted(reference[0]) != sorted(reference[k])  # the next epoch has other steps
    setups = [(1, 4, 0), (2, 8, 0), (2, 2, 1), (4, 4, 0), (4, 1, 0)]
    if streams:
        setups += [(1, 4, 2), (4, 2, 3)]  # two workers a rank; more workers than streams a rank (capped)
    for world_size, batch_size, workers in setups:
        steps = _global_steps(data_dir, world_size, batch_size, G, k + 2, num_workers=workers, **kw)
        _same_steps(steps, reference)


def test_each_rank_reads_about_its_share_of_the_shards(data_dir, monkeypatch):
    """I/O stays ~1/W a rank: rank r reads its streams' runs only (plus the start of the shard a run begins in)."""
    gopen = sys.modules["webdataset.gopen"]
    opened: list[str] = []
    real = gopen.gopen
    monkeypatch.setattr(gopen, "gopen", lambda url, *a, **k: opened.append(url) or real(url, *a, **k))
    per_rank = []
    for rank in range(4):
        opened.clear()
        loader = _loader(data_dir, batch_size=2, rank=rank, world_size=4, global_batch=G, streams=STREAMS)
        _take(loader, loader.batches_per_epoch)
        per_rank.append(set(opened))
        # 2 streams of 15 samples, ~4 shards each, and one more where a run starts inside a shard (the shard
        # where the rank's first stream ends and its second begins is opened by both)
        assert len(opened) <= 2 * (15 // 4 + 2)
    assert set().union(*per_rank) == {str(Path(data_dir, "train", f"shard-{i:06d}.tar")) for i in range(N_SHARDS)}


@pytest.mark.parametrize("workers", [0, 2])
def test_a_state_saved_on_two_ranks_resumes_on_one_and_four(data_dir, workers):
    kw = dict(streams=STREAMS, random_flip=True)
    k = (N_TRAIN // STREAMS) // (G // STREAMS)
    reference = _global_steps(data_dir, 2, 4, G, k + 3, **kw)
    for done in (3, k + 1):  # mid first epoch; in the second epoch
        first = _loader(data_dir, batch_size=4, world_size=2, global_batch=G, **kw)
        _take(first, done * 2)  # 2 micro-batches a step
        state = first.state_dict()  # rank 0's: the trainer loads it on every rank
        assert state["epoch"] == done // k and state["batches_in_epoch"] == 2 * (done % k)
        for world_size, batch_size in ((1, 8), (1, 16), (4, 4), (4, 2)):
            resumed = _global_steps(data_dir, world_size, batch_size, G, k + 3 - done, state=state,
                                    num_workers=workers, **kw)
            _same_steps(resumed, reference[done:])


def test_a_state_from_inside_a_step_resumes_only_with_the_same_micro_batch_and_ranks(data_dir):
    kw = dict(streams=STREAMS, global_batch=G)
    ref = [_take(_loader(data_dir, rank=r, world_size=2, **kw), 6) for r in range(2)]  # 4 × 2 ranks: 2 a step
    first = _loader(data_dir, world_size=2, **kw)
    _take(first, 3)  # half of step 1
    state = first.state_dict()
    for rank in range(2):
        resumed = _loader(data_dir, rank=rank, world_size=2, **kw)
        resumed.load_state_dict(state)
        _same(_take(resumed, 3), ref[rank][3:])
    with pytest.raises(ValueError) as info:
        _loader(data_dir, batch_size=4, world_size=1, **kw).load_state_dict(state)
    assert str(info.value) == (
        "loader state was saved inside global step 1 of epoch 0 (24 samples, global batch 16); a state from inside "
        "a step resumes only with the same micro-batch × ranks (saved 4 × 2, now 4 × 1); save at a step boundary")


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_reproduces_the_uninterrupted_run(data_dir, world_size, num_workers):
    kw = dict(world_size=world_size, num_workers=num_workers, random_flip=True)
    bpe = _loader(data_dir, **kw).batches_per_epoch
    s = 4  # default streams for a global batch of 4 or 8 over 31 shards
    assert bpe == (N_TRAIN // s) // (4 * world_size // s)
    total = 2 * bpe + 2
    for rank in range(world_size):
        full = _take(_loader(data_dir, rank=rank, **kw), total)
        assert len(full) == total and all(len(b.indices) == 4 for b in full)
        # mid first epoch, exactly at its end, and in the second epoch (the run so far crosses a boundary)
        for k in (3, bpe, bpe + 3):
            # the trainer resumes every rank from rank 0's state: positions are rank-independent
            first = _loader(data_dir, rank=0, **kw)
            head = _take(first, k)
            state = first.state_dict()
            assert state["epoch"] == k // (bpe + 1) and state["batches_in_epoch"] == (k if k <= bpe else k - bpe)
            assert all(isinstance(v, (int, str)) for v in state.values())
            resumed = _loader(data_dir, rank=rank, **kw)
            resumed.load_state_dict(state)
            tail = _take(resumed, total - k)
            if rank == 0:
                _same(head + tail, full)
            else:
                _same(tail, full[k:])
            assert resumed.epoch == 2


def test_state_from_another_setup_is_refused(data_dir):
    state = _loader(data_dir, global_batch=8).state_dict()
    for kw in (dict(seed=4), dict(global_batch=16), dict(streams=2), dict(shuffle_buffer=7)):
        with pytest.raises(ValueError, match="different setup"):
            _loader(data_dir, **{"global_batch": 8, **kw}).load_state_dict(state)
    for kw in (dict(num_workers=1), dict(batch_size=2), dict(batch_size=2, world_size=2)):  # elastic: fine
        _loader(data_dir, **{"global_batch": 8, **kw}).load_state_dict(state)
    held = _loader(data_dir, "heldout").state_dict()
    for kw in (dict(batch_size=8), dict(world_size=2), dict(num_workers=1)):
        with pytest.raises(ValueError, match="different setup"):
            _loader(data_dir, "heldout", **kw).load_state_dict(held)
    with pytest.raises(ValueError, match="lacks"):
        _loader(data_dir).load_state_dict({"epoch": 0})


def test_state_from_another_dataset_is_refused(data_dir, tmp_path):
    other = tmp_path / "other"
    write_dataset(_tiny_source(N_TRAIN - 4), str(other), "webdataset", shard_size=SHARD_SIZE)
    with pytest.raises(ValueError, match="different setup"):
        _loader(str(other)).load_state_dict(_loader(data_dir).state_dict())


def test_streams_that_do_not_fit_are_refused_up_front(data_dir):
    def refused(**kw) -> str:
        with pytest.raises(ValueError) as info:
            _loader(data_dir, **kw)
        return str(info.value)

    assert refused(streams=3, global_batch=16) == (
        "data.streams=3 does not divide the global batch 16: every step takes the same number of samples from each "
        "stream; set data.streams to a divisor of 16 (e.g. data.streams=4)")
    assert refused(streams=4, batch_size=2, world_size=8, global_batch=16) == (
        "data.streams=4 cannot be split evenly over 8 ranks (global batch 16); set data.streams to a multiple of 8 "
        "that divides 16 (e.g. data.streams=8) and keep it for the whole run: it fixes the order of the samples")
    assert refused(batch_size=2, world_size=8, global_batch=16) == (
        "data.streams=0 (the default: 4 streams) cannot be split evenly over 8 ranks (global batch 16); set "
        "data.streams to a multiple of 8 that divides 16 (e.g. data.streams=8) and keep it for the whole run: it "
        "fixes the order of the samples")
    assert refused(streams=32, global_batch=32) == (
        "data.streams=32 exceeds the 31 train shard(s): every stream needs a shard of its own; lower data.streams "
        "(e.g. data.streams=4) or write more, smaller shards (`tarflow data write --shard-size`)")
    assert "must be >= 0" in refused(streams=-1)
    assert "not a multiple of batch_size × world_size" in refused(batch_size=4, world_size=2, global_batch=12)
    assert "no batch" in refused(batch_size=64, world_size=2, streams=2)  # 2 streams of 61: no chunk of 64


# -- order, content ------------------------------------------------------------------------------------------------
def test_batches_hold_the_stored_samples_flipped_by_seed_epoch_key(data_dir):
    samples = _source_samples("train")
    loader = _loader(data_dir, random_flip=True, num_workers=1)
    bpe = loader.batches_per_epoch
    flipped = 0
    for i, b in enumerate(_take(loader, 2 * bpe)):
        assert b.images.dtype == torch.float32 and b.images.shape == (4, 1, 8, 8) and b.labels.dtype == torch.int64
        for image, label, index in zip(_to_u8(b.images), b.labels.tolist(), b.indices.tolist()):
            key, stored, stored_label = samples[index]
            flip = flip_decision(3, i // bpe, key)
            flipped += flip
            assert np.array_equal(image, stored[:, :, ::-1] if flip else stored) and label == stored_label
    assert 0 < flipped < 2 * bpe * 4
    assert dataset_info(_cfg(data_dir)) == ((1, 8, 8), 10)
    again = _take(_loader(data_dir, random_flip=True), bpe)
    other_seed = _take(_loader(data_dir, random_flip=True, seed=4), bpe)
    assert _indices(again) != _indices(other_seed)


@pytest.mark.parametrize("world_size,num_workers", [(1, 0), (2, 0), (3, 0), (2, 2)])
def test_heldout_yields_every_index_once_across_ranks(data_dir, world_size, num_workers):
    samples = _source_samples("heldout")
    indices = []
    for rank in range(world_size):
        loader = _loader(data_dir, "heldout", rank=rank, world_size=world_size, num_workers=num_workers)
        batches = _take(loader)
        assert len(batches) == loader.batches_per_epoch
        assert sum(len(b.indices) for b in batches) == loader.samples_per_epoch
        for b in batches:
            for image, label, index in zip(_to_u8(b.images), b.labels.tolist(), b.indices.tolist()):
                assert np.array_equal(image, samples[index][1]) and label == samples[index][2]  # never flipped
        indices += _indices(batches)
        assert _indices(_take(loader)) == _indices(batches)  # the next loop is the next epoch, same order
        assert loader.index_ordered == (num_workers <= 1)
    assert sorted(indices) == list(range(N_HELDOUT))
    if num_workers == 0:
        assert indices == list(range(N_HELDOUT))  # manifest order, rank after rank


# -- S3 ------------------------------------------------------------------------------------------------------------
@pytest.fixture
def s3_data(s3_bucket) -> str:
    return _write(f"s3://{s3_bucket}/digits")


def test_s3_reads_equal_local_reads_with_and_without_workers(s3_data, data_dir):
    for num_workers in (0, 2):
        kw = dict(num_workers=num_workers, world_size=2, rank=1)
        local = _loader(data_dir, **kw)
        n = local.batches_per_epoch + 2
        _same(_take(_loader(s3_data, **kw), n), _take(local, n))
        _same(_take(_loader(s3_data, "heldout", **kw)), _take(_loader(data_dir, "heldout", **kw)))


_RANK_SCRIPT = """
import json, sys
from data_pipeline.config import DataConfig
from data_pipeline.webdataset_loader import WebDatasetLoader
uri, rank = sys.argv[1], int(sys.argv[2])
cfg = DataConfig(format="webdataset", uri=uri, num_workers=1)
loader = WebDatasetLoader(cfg, "heldout", 4, seed=0, rank=rank, world_size=2)
print(json.dumps([i for batch in loader for i in batch.indices.tolist()]))
"""


def test_two_processes_read_their_parts_from_s3(s3_data):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _RANK_SCRIPT, s3_data, str(rank)], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    parts = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        parts.append(json.loads(out.strip().splitlines()[-1]))
    assert parts[0] and parts[1] and not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == list(range(N_HELDOUT))


@pytest.fixture
def closed_endpoint(s3_server, monkeypatch):
    """Point boto3 at a closed loopback port (fresh clients before and after)."""
    from data_pipeline.s3 import clear_s3_clients

    clear_s3_clients()
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    yield
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    clear_s3_clients()


def test_unreachable_endpoint_is_a_clear_error(s3_data, closed_endpoint):
    with pytest.raises(DataSourceError, match=r"cannot reach the S3 endpoint .*manifest\.json.*127\.0\.0\.1:9"):
        _loader(s3_data)


def test_endpoint_lost_after_start_names_the_shard(s3_data, monkeypatch):
    from data_pipeline.s3 import clear_s3_clients

    loader = _loader(s3_data, "heldout", num_workers=1)  # manifest read while the endpoint is up
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # the forked worker makes a new client
    with pytest.raises(DataSourceError, match=r"cannot reach the S3 endpoint for s3://.*/heldout/shard-\d+\.tar"):
        _take(loader)
    clear_s3_clients()


# -- bad input -----------------------------------------------------------------------------------------------------
def _rewrite_shard(path: Path, change) -> None:
    """Rewrite a tar shard member by member: ``change(name, data)`` returns new bytes."""
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            data = change(name, data)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _key(path: Path, index: int = 1) -> str:
    with tarfile.open(path) as tar:
        return sorted({m.name.split(".")[0] for m in tar.getmembers()})[index]


def _index_of(split: str, key: str) -> int:
    return [k for k, _, _ in _source_samples(split)].index(key)


def test_corrupt_png_names_shard_and_key_or_is_skipped_and_counted(fresh_dir):
    shard = Path(fresh_dir, "heldout", "shard-000002.tar")
    bad = _key(shard)
    _rewrite_shard(shard, lambda name, data: b"\x89PNG not really" if name == f"{bad}.png" else data)
    with pytest.raises(CorruptSampleError, match=rf"shard-000002\.tar, sample {bad}") as info:
        _take(_loader(fresh_dir, "heldout", num_workers=1, verify="none"))
    assert info.value.key == bad and info.value.shard.endswith("heldout/shard-000002.tar")

    loader = _loader(fresh_dir, "heldout", num_workers=1, skip_corrupt=True, verify="none")
    indices = _indices(_take(loader))
    assert indices == [i for i in range(N_HELDOUT) if i != _index_of("heldout", bad)]
    assert loader.skipped_corrupt == 1

    # a heldout batch whose samples are all corrupt is counted but not yielded (shard 1 = positions 4..7 = batch 1)
    shard = Path(fresh_dir, "heldout", "shard-000001.tar")
    _rewrite_shard(shard, lambda name, data: b"nope" if name.endswith(".png") else data)
    loader = _loader(fresh_dir, "heldout", skip_corrupt=True, verify="none")
    batches = _take(loader)
    assert len(batches) == loader.batches_per_epoch - 1 and loader.skipped_corrupt == 5
    assert _indices(batches) == [i for i in range(N_HELDOUT) if i not in (4, 5, 6, 7, _index_of("heldout", bad))]


def test_skipped_samples_keep_training_steps_full_and_resume_exact_on_other_ranks(fresh_dir):
    bad = set()
    for index in range(0, 31, 3):  # one corrupt sample in every third shard: 11 of 123, every stream meets some
        shard = Path(fresh_dir, "train", f"shard-{index:06d}.tar")
        key = _key(shard, index % 3)
        bad.add(_index_of("train", key))
        _rewrite_shard(shard, lambda member, data, key=key: b"garbage" if member == f"{key}.png" else data)
    with pytest.raises(CorruptSampleError, match="sample train-"):
        _take(_loader(fresh_dir, world_size=2, num_workers=2, verify="none"), 40)
    kw = dict(skip_corrupt=True, shuffle_buffer=50, streams=4, verify="none")
    k = (N_TRAIN // 4) // (8 // 4)  # 15 steps of 8 an epoch: a stream of 30 has no spare sample, so it wraps
    reference = _global_steps(fresh_dir, 2, 4, 8, 2 * k + 1, **kw)
    assert not bad & {i for step in reference for i in step}  # never a corrupt sample, every step full
    skipped = 0
    for rank in range(2):
        loader = _loader(fresh_dir, rank=rank, world_size=2, global_batch=8, **kw)
        _take(loader, k)
        skipped += loader.skipped_corrupt
    assert skipped >= len(bad)  # every corrupt sample is met in an epoch (some twice: their stream wrapped)
    # resume mid epoch 1 from rank 0's state: rank 0's streams know their skips, the others find theirs by decoding
    done = 2 * k - 2  # late in the epoch: every stream has skipped some by then
    first = _loader(fresh_dir, world_size=2, global_batch=8, **kw)
    _take(first, done)
    state = first.state_dict()
    counts = state["corrupt_in_epoch"].split(",")
    assert counts[2:] == ["-1", "-1"] and "0" not in counts[:2]
    for world_size, batch_size, workers in ((2, 4, 0), (1, 8, 2), (4, 2, 0)):
        resumed = _global_steps(fresh_dir, world_size, batch_size, 8, 2 * k + 1 - done, state=state,
                                num_workers=workers, **kw)
        _same_steps(resumed, reference[done:])


def test_truncated_tar_names_the_shard(fresh_dir):
    shard = Path(fresh_dir, "heldout", "shard-000001.tar")
    data = shard.read_bytes()
    shard.write_bytes(data[:512 + 40])  # inside the first image's bytes: tarfile fails
    with pytest.raises(DataSourceError, match=r"cannot read shard .*heldout/shard-000001\.tar: ReadError"):
        _take(_loader(fresh_dir, "heldout", verify="none"))
    shard.write_bytes(data[:4096])  # after 2 samples, at a member boundary: tarfile sees a short archive
    with pytest.raises(DataSourceError, match=r"shard-000001\.tar ended after 2 samples but the manifest lists 4"):
        _take(_loader(fresh_dir, "heldout", num_workers=1, verify="none"))


def test_missing_shard_and_missing_manifest_are_named(fresh_dir):
    Path(fresh_dir, "heldout", "shard-000003.tar").unlink()
    with pytest.raises(DataSourceError, match=r"shard .*shard-000003\.tar does not exist"):
        _take(_loader(fresh_dir, "heldout", num_workers=1, verify="none"))
    Path(fresh_dir, "train", "manifest.json").unlink()
    with pytest.raises(DataSourceError, match=r"train/manifest\.json"):
        _loader(fresh_dir, "train")


def test_manifest_shape_disagreeing_with_images(fresh_dir):
    path = Path(fresh_dir, "train", "manifest.json")
    manifest = json.loads(path.read_text())
    manifest["image_shape"] = [3, 8, 8]
    path.write_text(json.dumps(manifest))
    with pytest.raises(CorruptSampleError, match=r"manifest says \(3, 8, 8\).*shard-\d+\.tar, sample train-"):
        _take(_loader(fresh_dir, num_workers=1), 1)
    with pytest.raises(DataSourceError, match="none of the .* samples .* decodes"):  # skipping cannot help
        _take(_loader(fresh_dir, skip_corrupt=True), 1)


def test_heldout_with_fewer_shards_than_readers_still_reads_each_sample_once(tmp_path):
    """Evaluation must not fail because its split fits in one shard: workers are capped, ranks share the shard."""
    uri = str(tmp_path / "one")
    write_dataset(_tiny_source(), uri, "webdataset", shard_size=1 << 20)  # one shard per split
    indices = []
    for rank in (0, 1):
        indices += _indices(_take(_loader(uri, "heldout", batch_size=4, rank=rank, world_size=2, num_workers=2)))
    assert sorted(indices) == list(range(N_HELDOUT))


@pytest.mark.parametrize("workers", [0, 2])
def test_reading_leaves_the_global_rng_alone(data_dir, workers):
    """The trainer's noise comes from the global RNG; a loader starting its epochs must not draw from it."""
    loader = WebDatasetLoader(_cfg(data_dir, num_workers=workers), "train", 8, seed=0)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    batches = iter(loader)
    for _ in range(loader.batches_per_epoch + 2):  # crosses into a new epoch (a new DataLoader)
        next(batches)
    assert torch.equal(torch.rand(3), expected)
