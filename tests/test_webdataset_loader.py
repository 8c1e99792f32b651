"""WebDatasetLoader: exact resume, rank/worker split, heldout coverage, S3 (moto on loopback) and bad input."""

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
from data_pipeline.codecs import CorruptSampleError
from data_pipeline.config import DataConfig
from data_pipeline.sources import Source, open_source
from data_pipeline.storage import DataSourceError
from data_pipeline.transforms import flip_decision
from data_pipeline.webdataset_loader import WebDatasetLoader
from data_pipeline.writer import write_dataset

REPO = Path(__file__).resolve().parents[1]
N_TRAIN, N_HELDOUT = 123, 31  # 31 train shards (4 samples, the last 3), 8 heldout shards (4, the last 3)
SHARD_SIZE = 10600


def _tiny_source(n_train: int = N_TRAIN, n_heldout: int = N_HELDOUT) -> Source:
    src = open_source("digits")
    return Source(src.name, src.num_classes, src.image_shape,
                  {"train": lambda: itertools.islice(src.splits["train"](), n_train),
                   "heldout": lambda: itertools.islice(src.splits["heldout"](), n_heldout)},
                  {"train": n_train, "heldout": n_heldout})


def _source_samples(split: str) -> dict:
    """key → (uint8 image, label), in source (= manifest) order."""
    return {key: (image, label) for key, image, label in _tiny_source().splits[split]()}


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


def _loader(uri, split="train", batch_size=4, *, seed=3, rank=0, world_size=1, **kw) -> WebDatasetLoader:
    return WebDatasetLoader(_cfg(uri, **kw), split, batch_size, seed=seed, rank=rank, world_size=world_size,
                            with_keys=True)


def _take(loader, k=None) -> list:
    """k batches (all of one heldout epoch for None), the iterator closed afterwards (workers shut down)."""
    it = iter(loader)
    try:
        return list(itertools.islice(it, k)) if k is not None else list(it)
    finally:
        it.close()


def _keys(batches) -> list:
    return [k for b in batches for k in b[2]]


def _same(a, b):
    assert _keys(a) == _keys(b)
    assert len(a) == len(b)
    for (xa, ya, _), (xb, yb, _) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def _to_u8(x: torch.Tensor) -> np.ndarray:
    return torch.round((x + 1) * 127.5).to(torch.uint8).numpy()


# -- exact resumption ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_resume_reproduces_the_uninterrupted_run(data_dir, world_size, num_workers):
    kw = dict(world_size=world_size, num_workers=num_workers, random_flip=True)
    bpe = _loader(data_dir, **kw).batches_per_epoch
    assert bpe == N_TRAIN // (world_size * 4)
    total = 2 * bpe + 2
    for rank in range(world_size):
        full = _take(_loader(data_dir, rank=rank, **kw), total)
        assert len(full) == total and all(len(b[2]) == 4 for b in full)
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
    state = _loader(data_dir).state_dict()
    for kw in (dict(batch_size=8), dict(seed=4), dict(world_size=2), dict(num_workers=1), dict(shuffle_buffer=7)):
        with pytest.raises(ValueError, match="different setup"):
            _loader(data_dir, **kw).load_state_dict(state)
    with pytest.raises(ValueError, match="lacks"):
        _loader(data_dir).load_state_dict({"epoch": 0})


def test_state_from_another_dataset_is_refused(data_dir, tmp_path):
    other = tmp_path / "other"
    write_dataset(_tiny_source(N_TRAIN - 4), str(other), "webdataset", shard_size=SHARD_SIZE)
    with pytest.raises(ValueError, match="different setup"):
        _loader(str(other)).load_state_dict(_loader(data_dir).state_dict())


# -- splitting, order, content -------------------------------------------------------------------------------------
def test_ranks_and_workers_read_disjoint_samples_and_epochs_reshuffle(data_dir):
    kw = dict(world_size=2, num_workers=2)
    loaders = [_loader(data_dir, rank=r, **kw) for r in range(2)]
    bpe = loaders[0].batches_per_epoch
    assert loaders[1].batches_per_epoch == bpe == N_TRAIN // 8 and loaders[0].samples_per_epoch == bpe * 4
    runs = [_take(l, 2 * bpe) for l in loaders]
    epoch0 = [_keys(run[:bpe]) for run in runs]
    epoch1 = [_keys(run[bpe:]) for run in runs]
    for keys in (epoch0, epoch1):
        union = keys[0] + keys[1]
        assert len(set(union)) == len(union) == 2 * bpe * 4  # every sample at most once across ranks × workers
        assert N_TRAIN - len(union) < 2 * 4                   # fewer than world_size × batch_size dropped
        assert set(union) <= set(_source_samples("train"))
    assert epoch0[0] != epoch1[0] and epoch0[1] != epoch1[1]  # another order every epoch
    again = _take(_loader(data_dir, rank=1, **kw), 2 * bpe)
    _same(again, runs[1])                                      # same seed, same stream
    other_seed = _take(_loader(data_dir, rank=1, seed=4, **kw), bpe)
    assert _keys(other_seed) != epoch0[1]


def test_batches_hold_the_stored_samples_flipped_by_seed_epoch_key(data_dir):
    samples = _source_samples("train")
    loader = _loader(data_dir, random_flip=True, num_workers=1)
    bpe = loader.batches_per_epoch
    flipped = 0
    for i, (x, y, keys) in enumerate(_take(loader, 2 * bpe)):
        assert x.dtype == torch.float32 and x.shape == (4, 1, 8, 8) and y.dtype == torch.int64
        for image, label, key in zip(_to_u8(x), y.tolist(), keys):
            stored, stored_label = samples[key]
            flip = flip_decision(3, i // bpe, key)
            flipped += flip
            assert np.array_equal(image, stored[:, :, ::-1] if flip else stored) and label == stored_label
    assert 0 < flipped < 2 * bpe * 4
    assert dataset_info(_cfg(data_dir)) == ((1, 8, 8), 10)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_heldout_covers_every_sample_once_across_ranks(data_dir, num_workers):
    samples = _source_samples("heldout")
    keys = []
    for rank in range(2):
        loader = _loader(data_dir, "heldout", rank=rank, world_size=2, num_workers=num_workers)
        batches = _take(loader)
        assert len(batches) == loader.batches_per_epoch and sum(len(b[2]) for b in batches) == loader.samples_per_epoch
        for x, y, ks in batches:
            for image, label, key in zip(_to_u8(x), y.tolist(), ks):  # never flipped
                assert np.array_equal(image, samples[key][0]) and label == samples[key][1]
        keys += _keys(batches)
        assert _keys(_take(loader)) == _keys(batches)  # the next loop is the next epoch, same order
    assert sorted(keys) == sorted(samples) and len(keys) == len(samples)
    if num_workers == 0:
        assert keys == list(samples)  # manifest order


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
loader = WebDatasetLoader(cfg, "heldout", 4, seed=0, rank=rank, world_size=2, with_keys=True)
print(json.dumps([k for _, _, keys in loader for k in keys]))
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
    assert sorted(parts[0] + parts[1]) == sorted(_source_samples("heldout"))


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


def _first_key(path: Path, index: int = 1) -> str:
    with tarfile.open(path) as tar:
        return sorted({m.name.split(".")[0] for m in tar.getmembers()})[index]


def test_corrupt_png_names_shard_and_key_or_is_skipped_and_counted(fresh_dir):
    shard = Path(fresh_dir, "heldout", "shard-000002.tar")
    bad = _first_key(shard)
    _rewrite_shard(shard, lambda name, data: b"\x89PNG not really" if name == f"{bad}.png" else data)
    with pytest.raises(CorruptSampleError, match=rf"shard-000002\.tar, sample {bad}") as info:
        _take(_loader(fresh_dir, "heldout", num_workers=1))
    assert info.value.key == bad and info.value.shard.endswith("heldout/shard-000002.tar")

    loader = _loader(fresh_dir, "heldout", num_workers=1, skip_corrupt=True)
    keys = _keys(_take(loader))
    assert sorted(keys) == sorted(set(_source_samples("heldout")) - {bad}) and loader.skipped_corrupt == 1

    # a heldout batch whose samples are all corrupt is counted but not yielded (shard 1 = positions 4..7 = batch 1)
    shard = Path(fresh_dir, "heldout", "shard-000001.tar")
    lost = {_first_key(shard, i) for i in range(4)}
    _rewrite_shard(shard, lambda name, data: b"nope" if name.endswith(".png") else data)
    loader = _loader(fresh_dir, "heldout", skip_corrupt=True)
    batches = _take(loader)
    assert len(batches) == loader.batches_per_epoch - 1 and loader.skipped_corrupt == 5
    assert sorted(_keys(batches)) == sorted(set(_source_samples("heldout")) - {bad} - lost)


def test_skipped_samples_keep_training_batches_full_and_resume_exact(fresh_dir):
    bad_keys = []
    for index in range(0, 31, 3):  # one corrupt sample in every third shard: 11 of 123, every reader meets some
        shard = Path(fresh_dir, "train", f"shard-{index:06d}.tar")
        bad_keys.append(bad := _first_key(shard, index % 3))
        _rewrite_shard(shard, lambda member, data, bad=bad: b"garbage" if member == f"{bad}.png" else data)
    with pytest.raises(CorruptSampleError, match="sample train-"):
        _take(_loader(fresh_dir, world_size=2, num_workers=2), 40)
    kw = dict(world_size=2, num_workers=2, skip_corrupt=True, shuffle_buffer=50)
    bpe = _loader(fresh_dir, **kw).batches_per_epoch
    total, k = 2 * bpe + 1, 2 * bpe - 3
    full_runs, end_states, skipped = [], [], 0
    for rank in range(2):
        loader = _loader(fresh_dir, rank=rank, **kw)
        epoch0 = _take(loader, bpe)
        skipped += loader.skipped_corrupt
        full_runs.append(epoch0 + _take(loader, total - bpe))
        end_states.append(loader.state_dict())
    for run in full_runs:  # equal counts of full batches on both ranks, never a corrupt sample
        assert len(run) == total and all(len(b[2]) == 4 for b in run)
        assert not set(bad_keys) & set(_keys(run))
    # every corrupt sample is met (readers run short: 11 skipped > 3 spare, so they wrap around to their start)
    assert skipped >= len(bad_keys)
    # resume mid epoch 1 from each rank's own state, and rank 1 from rank 0's (it then decodes to find its skips)
    for rank, source_rank in ((0, 0), (1, 1), (1, 0)):
        first = _loader(fresh_dir, rank=source_rank, **kw)
        _take(first, k)
        state = first.state_dict()
        assert "0" not in state["corrupt_in_epoch"].split(",")  # skip counts matter for every worker here
        resumed = _loader(fresh_dir, rank=rank, **kw)
        resumed.load_state_dict(state)
        _same(_take(resumed, total - k), full_runs[rank][k:])
        if source_rank == rank:
            assert resumed.state_dict() == end_states[rank]
        else:  # the per-worker counts it found equal those of rank 1's own uninterrupted run
            assert resumed.state_dict()["corrupt_in_epoch"] == end_states[rank]["corrupt_in_epoch"]


def test_truncated_tar_names_the_shard(fresh_dir):
    shard = Path(fresh_dir, "heldout", "shard-000001.tar")
    data = shard.read_bytes()
    shard.write_bytes(data[:512 + 40])  # inside the first image's bytes: tarfile fails
    with pytest.raises(DataSourceError, match=r"cannot read shard .*heldout/shard-000001\.tar: ReadError"):
        _take(_loader(fresh_dir, "heldout"))
    shard.write_bytes(data[:4096])  # after 2 samples, at a member boundary: tarfile sees a short archive
    with pytest.raises(DataSourceError, match=r"shard-000001\.tar ended after 2 samples but the manifest lists 4"):
        _take(_loader(fresh_dir, "heldout", num_workers=1))


def test_missing_shard_and_missing_manifest_are_named(fresh_dir):
    Path(fresh_dir, "heldout", "shard-000003.tar").unlink()
    with pytest.raises(DataSourceError, match=r"shard-000003\.tar"):
        _take(_loader(fresh_dir, "heldout", num_workers=1))
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


def test_too_few_shards_for_ranks_and_workers_is_refused_up_front(data_dir):
    with pytest.raises(ValueError, match=r"31 shard\(s\).*2 rank\(s\) × 16 .*--shard-size.*num_workers"):
        _loader(data_dir, "train", world_size=2, num_workers=16)
    with pytest.raises(ValueError, match="no batch"):
        _loader(data_dir, batch_size=100, world_size=2)


def test_heldout_with_fewer_shards_than_readers_still_reads_each_sample_once(tmp_path):
    """Evaluation must not fail because its split fits in one shard: workers are capped, ranks share the shard."""
    uri = str(tmp_path / "one")
    write_dataset(_tiny_source(), uri, "webdataset", shard_size=1 << 20)  # one shard per split
    keys = []
    for rank in (0, 1):
        keys += _keys(_take(_loader(uri, "heldout", batch_size=4, rank=rank, world_size=2, num_workers=2)))
    assert sorted(keys) == sorted(_source_samples("heldout"))


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
