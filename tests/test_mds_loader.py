"""MDSLoader (data.format=mds over mosaicml-streaming): the samples of a global step are the same set on every
launch (ranks, micro-batch, accumulation, workers), exact resumption also onto another number of ranks, every
sample once per epoch, heldout exactly once, S3 = local, and clear errors for bad data and bad places.

Every loader gets a fresh cache directory; multi-rank cases run as real processes (streaming coordinates the ranks
of a machine through named shared memory and torch.distributed), ``tests/workers/mds_ranks.py`` being their entry
point. Launches over several machines cannot run on one machine; for them the step sets are checked on
streaming's own partition function."""

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
from data_pipeline.batch import Batch
from data_pipeline.codecs import CorruptSampleError, encode_image
from data_pipeline.config import DataConfig
from data_pipeline.manifest import MANIFEST_NAME, Manifest, ShardInfo, sha256_file
from data_pipeline.mds_loader import MDSLoader
from data_pipeline.mds_streaming import Placement, canonical_nodes, train_steps_per_epoch
from data_pipeline.s3 import clear_s3_clients
from data_pipeline.sources import open_source
from data_pipeline.storage import DataSourceError
from data_pipeline.writer import write_dataset

REPO = Path(__file__).resolve().parents[1]
RANKS_WORKER = REPO / "tests" / "workers" / "mds_ranks.py"
N_TRAIN, N_HELDOUT = 1617, 180
SHARD_SIZE = 4000  # bytes: 69 train shards, 8 heldout shards

pytestmark = pytest.mark.streaming  # every test builds MDS loaders: see tests/conftest.py


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


def _flat(batches) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """(indices, labels, images) of the batches, concatenated."""
    assert all(isinstance(b, Batch) and b.indices.dtype == torch.int64 for b in batches)
    indices = [int(i) for b in batches for i in b.indices]
    return indices, torch.cat([b.labels for b in batches]), torch.cat([b.images for b in batches])


def _steps(per_rank: list[list[list[int]]], per_step: int) -> list[list[int]]:
    """The sample indices of each optimizer step (``per_step`` micro-batches on every rank), sorted: what a step
    holds, whatever rank and micro-batch held each sample."""
    n = len(per_rank[0]) // per_step
    return [sorted(i for rank in per_rank for batch in rank[k * per_step:(k + 1) * per_step] for i in batch)
            for k in range(n)]


def _roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# -- exact resumption, one rank ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("save_workers,resume_workers,k", [(0, 0, 17), (1, 1, 50), (2, 2, 23), (2, 0, 52)])
def test_resume_continues_exactly_one_rank(digits_mds, tmp_path, save_workers, resume_workers, k):
    """Interrupt after k batches (mid-epoch, at the epoch boundary, in the next epoch), save, resume in a new loader
    (and with another worker count): the concatenation is the uninterrupted stream, indices, labels and pixels."""
    batch = 32
    with MDSLoader(_cfg(digits_mds, tmp_path, num_workers=save_workers), "train", batch, seed=11) as ref_loader:
        bpe = ref_loader.batches_per_epoch
        assert bpe == N_TRAIN // batch == 50
        total = bpe + 6  # across the epoch boundary
        ref = _take(ref_loader, total)
    with MDSLoader(_cfg(digits_mds, tmp_path, num_workers=save_workers), "train", batch, seed=11) as first:
        head = _take(first, k)
        state = _roundtrip(first.state_dict())
    epoch = (k - 1) // bpe  # at a boundary the state is "epoch e, all its batches" (the roll-over is pending)
    assert state["epoch"] == epoch and state["batches_in_epoch"] == k - epoch * bpe
    assert state["streaming"]["sample_in_epoch"] == state["batches_in_epoch"] * batch
    with MDSLoader(_cfg(digits_mds, tmp_path, num_workers=resume_workers), "train", batch, seed=11) as second:
        second.load_state_dict(state)
        tail = _take(second, total - k)
    ref_indices, ref_labels, ref_images = _flat(ref)
    indices, labels, images = _flat(head + tail)
    assert indices == ref_indices
    assert torch.equal(labels, ref_labels) and torch.equal(images, ref_images)
    assert all(b.images.shape == (batch, 1, 8, 8) and b.images.dtype == torch.float32 for b in ref)


def test_same_seed_same_order_epochs_differ_every_sample_once(digits_mds, tmp_path):
    batch = 25
    with MDSLoader(_cfg(digits_mds, tmp_path), "train", batch, seed=5) as a:
        bpe = a.batches_per_epoch
        assert bpe == N_TRAIN // batch and a.samples_per_epoch == bpe * batch and a.num_samples == N_TRAIN
        gen = iter(a)
        first = list(itertools.islice(gen, 10))
        gen.close()  # a stopped loop ...
        assert a.epoch == 0 and a.state_dict()["batches_in_epoch"] == 10
        rest = _take(a, 2 * bpe - 10)  # ... and a new loop over the same loader continue where it stopped
        assert a.epoch == 1
    indices, labels, images = _flat(first + rest)
    epoch0, epoch1 = indices[:bpe * batch], indices[bpe * batch:]
    for epoch in (epoch0, epoch1):
        assert len(set(epoch)) == len(epoch) == bpe * batch  # at most once; the 17 left out are the order's tail
        assert set(epoch) <= set(range(N_TRAIN))
    assert epoch0 != epoch1 and set(epoch0) != set(epoch1)  # another order, another tail left out
    assert torch.all((images >= -1) & (images <= 1)) and labels.dtype == torch.int64
    # index i is the source's i-th sample: its pixels and label
    source = list(open_source("digits").splits["train"]())
    for i in range(0, len(indices), 97):
        _, image, label = source[indices[i]]
        assert int(labels[i]) == label
        assert np.array_equal(torch.round((images[i] + 1) * 127.5).to(torch.uint8).numpy(), image)

    with MDSLoader(_cfg(digits_mds, tmp_path), "train", batch, seed=5) as same:
        assert _flat(_take(same, 3))[0] == indices[:3 * batch]
    with MDSLoader(_cfg(digits_mds, tmp_path), "train", batch, seed=6) as other:
        assert _flat(_take(other, 3))[0] != indices[:3 * batch]


def test_steps_holding_streamings_repeats_are_not_yielded(digits_mds, tmp_path):
    """With 4 canonical nodes, 1617 samples make streaming repeat a sample at position 1616 of each epoch's order;
    batches of 49 would fill 33 steps = 1617 positions. The loader stops after 32 full steps: no repeats. With
    micro-batches of 7 and 7 of them per step the cut is the same 32 whole steps (224 micro-batches)."""
    with MDSLoader(_cfg(digits_mds, tmp_path, num_canonical_nodes=4), "train", 49, seed=0) as loader:
        assert loader.batches_per_epoch == 32
        indices = _flat(_take(loader, 64))[0]
    for epoch in (indices[:32 * 49], indices[32 * 49:]):
        assert len(set(epoch)) == len(epoch) == 32 * 49
    with MDSLoader(_cfg(digits_mds, tmp_path, num_canonical_nodes=4), "train", 7, seed=0,
                   global_batch=49) as micro:
        assert micro.batches_per_epoch == 32 * 7
        assert _flat(_take(micro, 7))[0] == indices[:49]  # one rank: the same order, in smaller batches


def test_random_flip_depends_on_seed_epoch_key_only(digits_mds, digits_keys, tmp_path):
    cfg = _cfg(digits_mds, tmp_path, random_flip=True)
    with MDSLoader(cfg, "train", 50, seed=1) as flipped, \
            MDSLoader(_cfg(digits_mds, tmp_path), "train", 50, seed=1) as plain:
        a, b = _take(flipped, 2), _take(plain, 2)
    from data_pipeline.transforms import flip_decision

    for (xa, _, ia), (xb, _, ib) in zip(a, b):
        assert torch.equal(ia, ib)
        for i, index in enumerate(ia.tolist()):
            key = digits_keys["train"][index]
            expected = torch.flip(xb[i], dims=[-1]) if flip_decision(1, 0, key) else xb[i]
            assert torch.equal(xa[i], expected)


# -- heldout -----------------------------------------------------------------------------------------------------------
def test_heldout_natural_order_once_per_loop_and_resume(digits_mds, tmp_path):
    cfg = _cfg(digits_mds, tmp_path, num_workers=1)
    with MDSLoader(cfg, "heldout", 32, seed=0) as loader:
        assert loader.batches_per_epoch == 6
        batches = list(loader)
        assert [len(b.indices) for b in batches] == [32] * 5 + [20]
        assert _flat(batches)[0] == list(range(N_HELDOUT))  # the order written, every sample once
        assert _flat(list(loader))[0] == list(range(N_HELDOUT)) and loader.epoch == 1  # the next loop: next epoch
    with MDSLoader(_cfg(digits_mds, tmp_path), "heldout", 32, seed=0) as first:
        _take(first, 2)
        state = _roundtrip(first.state_dict())
        first.rewind()  # an evaluation that stopped early: the next one reads the same images from the start
        assert first.index_ordered and _flat(_take(first, 1))[0] == list(range(32))
    with MDSLoader(_cfg(digits_mds, tmp_path), "heldout", 32, seed=0) as second:
        second.load_state_dict(state)
        assert _flat(list(second))[0] == list(range(64, N_HELDOUT))
    with MDSLoader(_cfg(digits_mds, tmp_path), "heldout", 16, seed=0) as smaller:  # another micro-batch: elastic
        smaller.load_state_dict(state)
        assert _flat(list(smaller))[0] == list(range(64, N_HELDOUT))


# -- the same step on every launch: streaming's partition (any number of machines) ------------------------------------
# (machines, ranks per machine, micro-batch, micro-batches per step, workers per rank): 16 samples per step each
LAUNCHES_OF_16 = [(1, 1, 16, 1, 1), (1, 1, 8, 2, 3), (1, 2, 8, 1, 2), (2, 1, 8, 1, 1), (1, 4, 4, 1, 1),
                  (2, 2, 4, 1, 2), (4, 1, 4, 1, 3), (4, 1, 2, 2, 1), (1, 4, 2, 2, 3)]


def _partition_steps(ncn: int, launch: tuple, steps: int, drop_first: int = 0, initial_nodes=None) -> list:
    """The sorted indices of each step as streaming's own partition function deals them to a launch (positions
    before its shuffle, a permutation that does not depend on the launch)."""
    from streaming.base.partition import get_partitions

    nodes, ranks, batch, per_step, workers = launch
    ids = get_partitions("relaxed", N_TRAIN, ncn, nodes, ranks, workers, batch, drop_first, initial_nodes)
    # (nodes, ranks, workers, batches per worker, batch): the DataLoader takes its workers' batches in turn, so a
    # rank's batch j·workers + w is worker w's batch j
    per_rank = ids.transpose(0, 1, 3, 2, 4).reshape(nodes * ranks, -1, batch)
    return _steps([[b.tolist() for b in rank[:steps * per_step]] for rank in per_rank], per_step)


@pytest.mark.parametrize("ncn,steps_per_epoch", [(1, 101), (4, 101), (64, 100)])
def test_streaming_deals_step_k_the_same_set_on_every_launch(ncn, steps_per_epoch):
    """N = 1617, 16 samples a step. With 64 canonical nodes the rows hold 25 or 26 samples and row 0 is short, so
    streaming repeats a sample at position 25 × 64 = 1600: 100 steps; otherwise no repeat before 1616: 101 steps."""
    assert train_steps_per_epoch(N_TRAIN, ncn, 16) == steps_per_epoch
    reference = _partition_steps(ncn, LAUNCHES_OF_16[0], steps_per_epoch)
    for launch in LAUNCHES_OF_16[1:]:
        assert _partition_steps(ncn, launch, steps_per_epoch) == reference, launch
    flat = [i for step in reference for i in step]
    assert len(set(flat)) == len(flat) == 16 * steps_per_epoch and min(flat) >= 0  # each sample once, no padding
    # a state saved after 40 steps on any launch resumes on any other: the same steps follow
    for saved in LAUNCHES_OF_16[2], LAUNCHES_OF_16[6]:
        for launch in LAUNCHES_OF_16:
            resumed = _partition_steps(ncn, launch, steps_per_epoch - 40, 40 * 16, initial_nodes=saved[0])
            assert resumed == reference[40:], (saved, launch)


def test_num_canonical_nodes_must_fit_the_machines_and_global_batch_the_micro_batches(digits_mds, tmp_path):
    assert canonical_nodes(0, Placement(0, 1, 0, 1)) == 1  # older configs' 0 is the fixed default, 1
    assert canonical_nodes(1, Placement(0, 6, 0, 2)) == 1 and canonical_nodes(8, Placement(0, 8, 0, 4)) == 8
    with pytest.raises(ValueError, match=r"data.num_canonical_nodes=3 does not fit the 2 machines .*WORLD_SIZE=4 "
                                         r"/ LOCAL_WORLD_SIZE=2"):
        canonical_nodes(3, Placement(0, 4, 0, 2))
    with pytest.raises(ValueError, match=r"data.num_canonical_nodes=-1 must be >= 1"):
        canonical_nodes(-1, Placement(0, 1, 0, 1))
    with pytest.raises(ValueError, match=r"data.num_canonical_nodes=64 is more than the 60 samples to shuffle"):
        canonical_nodes(64, Placement(0, 1, 0, 1), num_samples=60)
    with pytest.raises(ValueError, match=r"global_batch=24 is not a multiple of batch_size × world_size = 16 × 1"):
        MDSLoader(_cfg(digits_mds, tmp_path), "train", 16, seed=0, global_batch=24)
    with MDSLoader(_cfg(digits_mds, tmp_path, num_canonical_nodes=0), "train", 16, seed=0) as loader:
        assert loader.state_dict()["num_canonical_nodes"] == 1


# -- the same step on every launch, and resumption elsewhere: real processes -------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world: int, spec: dict, tmp_path: Path, name: str) -> list[dict[str, dict]]:
    """Run ``tests/workers/mds_ranks.py`` on ``world`` ranks of this machine; per rank, what each run read."""
    out = tmp_path / name
    out.mkdir()
    spec = {**spec, "out": str(out)}
    spec_path = out / "spec.json"
    spec_path.write_text(json.dumps(spec))
    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(RANKS_WORKER), str(spec_path)], env=env, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    for proc in procs:
        try:
            logs.append(proc.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, log[-4000:]
    return [{run["name"]: json.loads((out / f"{run['name']}.rank{rank}.json").read_text()) for run in spec["runs"]}
            for rank in range(world)]


def test_step_sets_agree_on_1_2_4_ranks_and_a_state_resumes_on_another_world(digits_mds, tmp_path):
    """16 samples a step, 101 steps an epoch, 104 steps read (across the epoch boundary): on 1 rank (micro-batch 16,
    or 8 twice), 2 ranks (8; 2 workers, 1, 0) and 4 ranks (4, or 2 twice; no workers) every step holds the same
    samples. A state saved on 2 ranks after 40 steps resumes on 1, 2 and 4 ranks with the same steps 40..103; on
    the same 2 ranks each rank continues exactly (indices, labels, pixels)."""
    g, steps, k, seed = 16, 104, 40, 3

    def local(batch, state=None, count=steps):  # one rank, in this process
        with MDSLoader(_cfg(digits_mds, tmp_path), "train", batch, seed=seed, global_batch=g) as loader:
            if state is not None:
                loader.load_state_dict(state)
            return _steps([[b.indices.tolist() for b in _take(loader, count * g // batch)]], g // batch)

    reference = local(16)
    assert local(8) == reference
    epoch0 = [i for step in reference[:101] for i in step]
    assert len(set(epoch0)) == len(epoch0) == 101 * g and set(epoch0) <= set(range(N_TRAIN))
    assert reference[101:] != reference[:3]  # epoch 1 is another order

    train = {"split": "train", "batch": 8, "global_batch": g, "steps": steps}
    two = _launch(2, {"uri": str(digits_mds), "seed": seed, "num_canonical_nodes": 1, "runs": [
        {**train, "name": "full", "workers": 2},
        {**train, "name": "head", "workers": 1, "save_after": k},
        {**train, "name": "tail", "workers": 0, "steps": steps - k, "load": str(tmp_path / "two/head.state0.pt")},
        {"name": "heldout", "split": "heldout", "batch": 16, "workers": 1},
    ]}, tmp_path, "two")
    state = torch.load(tmp_path / "two" / "head.state0.pt", weights_only=True)
    assert state == torch.load(tmp_path / "two" / "head.state1.pt", weights_only=True)
    assert (state["world_size"], state["batch_size"], state["batches_in_epoch"]) == (2, 8, k)
    assert state["streaming"]["sample_in_epoch"] == k * g
    assert all(r["full"]["batches_per_epoch"] == 101 for r in two)
    assert _steps([r["full"]["indices"] for r in two], 1) == reference
    for r in two:  # the same world: each rank's own sequence, exactly
        for field in ("indices", "labels", "pixels"):
            assert r["head"][field] + r["tail"][field] == r["full"][field]
    assert [i for b in two[0]["heldout"]["indices"] for i in b] == list(range(0, N_HELDOUT, 2))
    assert [i for b in two[1]["heldout"]["indices"] for i in b] == list(range(1, N_HELDOUT, 2))
    assert two[0]["heldout"]["cache"] == two[1]["heldout"]["cache"]  # one cache on the machine, made by local rank 0

    four = _launch(4, {"uri": str(digits_mds), "seed": seed, "num_canonical_nodes": 1, "runs": [
        {**train, "name": "b4", "batch": 4, "workers": 0},
        {**train, "name": "b2", "batch": 2, "workers": 0},
        {**train, "name": "resumed", "batch": 4, "workers": 0, "steps": steps - k,
         "load": str(tmp_path / "two/head.state0.pt")},
    ]}, tmp_path, "four")
    assert [r["b2"]["batches_per_epoch"] for r in four] == [202] * 4
    assert _steps([r["b4"]["indices"] for r in four], 1) == reference
    assert _steps([r["b2"]["indices"] for r in four], 2) == reference
    assert _steps([r["resumed"]["indices"] for r in four], 1) == reference[k:]
    assert _steps([r["tail"]["indices"] for r in two], 1) == reference[k:]
    assert local(16, state, steps - k) == reference[k:] and local(8, state, steps - k) == reference[k:]


# -- reading: streaming's own __iter__ and shard reader are the reference ---------------------------------------------
def _keys(rows: list[dict]) -> list[str]:
    return [row["key"] for row in rows]


def test_reads_what_streamings_own_iteration_reads(digits_mds, digits_keys, tmp_path):
    """The loader steps through the epoch itself, reading whole shard files; the stock ``StreamingDataset`` with
    the same shuffle, partition and batch size (its ``__iter__``: per-sample ``get_item`` behind its prepare and
    ready threads) read through a DataLoader of 2 workers, must yield the same samples in the same order, in
    epoch 0, in epoch 1 (the loader's workers persist across the boundary) and after a resume mid-epoch."""
    from streaming import StreamingDataset

    from data_pipeline.mds_loader import SHUFFLE_ALGO
    from data_pipeline.mds_streaming import PARTITION_ALGO

    batch, k = 32, 10
    with MDSLoader(_cfg(digits_mds, tmp_path, num_workers=2), "train", batch, seed=4) as loader:
        bpe = loader.batches_per_epoch
        ours = [[digits_keys["train"][i] for i in b.indices.tolist()] for b in _take(loader, 2 * bpe)]
        with MDSLoader(_cfg(digits_mds, tmp_path, num_workers=2), "train", batch, seed=4) as head:
            _take(head, k)
            state = head.state_dict()
        with MDSLoader(_cfg(digits_mds, tmp_path, num_workers=1), "train", batch, seed=4) as resumed:
            resumed.load_state_dict(state)
            ours_resumed = [[digits_keys["train"][i] for i in b.indices.tolist()] for b in _take(resumed, bpe - k)]
        stock = StreamingDataset(remote=str(digits_mds / "train"), local=str(tmp_path / "stock"), shuffle=True,
                                 shuffle_algo=SHUFFLE_ALGO, shuffle_seed=loader._shuffle_seed,
                                 shuffle_block_size=loader._shuffle_block_size, num_canonical_nodes=1,
                                 partition_algo=PARTITION_ALGO, batch_size=batch)
        reader = torch.utils.data.DataLoader(stock, batch_size=batch, num_workers=2, collate_fn=_keys)
        theirs = [b for _ in range(2) for b in list(reader)[:bpe]]  # epochs 0 and 1, each cut where ours is
        assert ours == theirs
        stock.next_epoch = 0  # streaming ignores a saved epoch older than its counter (2 by now)
        stock.load_state_dict(state["streaming"])
        assert ours_resumed == list(reader)[:bpe - k] == ours[k:bpe]


def test_shard_bytes_are_streamings_and_a_bad_header_is_a_corrupt_shard(digits_copy, tmp_path, monkeypatch):
    """Every sample's bytes as streaming's own ``MDSReader.get_sample_data`` reads them, with fewer mappings allowed
    than shards (the least recently opened are closed); a shard whose offset table is garbage (its size kept, so
    the size check passes) makes each of its samples a corrupt sample naming the shard."""
    import hashlib

    from data_pipeline import mds_streaming

    monkeypatch.setattr(mds_streaming, "MAX_MAPPED_SHARDS", 3)
    with MDSLoader(_cfg(digits_copy, tmp_path), "heldout", 32, seed=0) as loader:
        ds = loader._streaming
        for shard_id, shard in enumerate(ds.shards):
            ds._local_and_mapped(shard_id)
            assert all(ds._mapped.sample_bytes(shard_id, i) == shard.get_sample_data(i) for i in range(shard.samples))
        assert len(ds._mapped._maps) == 3
        first_of_shard_2 = int(ds.sample_offset_per_shard[2])
        in_shard_2 = set(range(first_of_shard_2, first_of_shard_2 + ds.shards[2].samples))
    shard = digits_copy / "heldout" / "shard.00002.mds"
    data = bytearray(shard.read_bytes())
    data[4:12] = b"\xff" * 8  # the first two offsets point past the end of the file
    shard.write_bytes(bytes(data))
    index_path = digits_copy / "heldout" / "index.json"  # the new sha1, so that streaming's checksum passes
    index = json.loads(index_path.read_text())
    index["shards"][2]["raw_data"]["hashes"]["sha1"] = hashlib.sha1(bytes(data)).hexdigest()
    index_path.write_text(json.dumps(index))
    with MDSLoader(_cfg(digits_copy, tmp_path), "heldout", 32, seed=0) as loader:
        with pytest.raises(CorruptSampleError, match=r"unreadable MDS shard: .*header") as info:
            list(loader)
        assert info.value.shard == "shard.00002.mds"
    with MDSLoader(_cfg(digits_copy, tmp_path, skip_corrupt=True, num_workers=1), "heldout", 32, seed=0) as loader:
        assert _flat(list(loader))[0] == [i for i in range(N_HELDOUT) if i not in in_shard_2]
        assert loader.skipped_corrupt == len(in_shard_2)


def test_a_shard_failing_its_checksum_fails_every_read(digits_copy, tmp_path):
    """A shard that differs from index.json's sha1 (its size kept): streaming's checksum refuses it, a
    DataSourceError naming the shard, in this epoch and the next (not a hang on the shard streaming left
    "preparing", nor the failed file taken as good the second time)."""
    root = digits_copy
    shard = root / "train" / "shard.00001.mds"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with MDSLoader(_cfg(root, tmp_path, num_workers=1), "train", 32, seed=0) as loader:
        for _ in range(2):
            with pytest.raises(DataSourceError, match=r"train/shard\.00001\.mds: ValueError: Checksum failure"):
                _take(loader, loader.batches_per_epoch)


def test_train_workers_persist_across_epochs_and_stop_on_close(digits_mds, tmp_path):
    """With 2 workers, a loop stopped mid-epoch and a new loop that runs into the next epoch yield the batches of
    a loader without workers; the same worker processes serve both epochs and are gone after close()."""
    import multiprocessing

    with MDSLoader(_cfg(digits_mds, tmp_path), "train", 64, seed=9) as plain:
        reference = _flat(_take(plain, 30))[0]
    others = set(multiprocessing.active_children())
    with MDSLoader(_cfg(digits_mds, tmp_path, num_workers=2), "train", 64, seed=9) as loader:
        assert loader.batches_per_epoch == 25
        head = _take(loader, 10)
        workers = set(multiprocessing.active_children()) - others
        tail = _take(loader, 20)  # the rest of epoch 0, and 5 batches of epoch 1
        assert len(workers) == 2 and workers <= set(multiprocessing.active_children())
    assert _flat(head + tail)[0] == reference
    assert not any(p.is_alive() for p in workers)


# -- S3 ----------------------------------------------------------------------------------------------------------------
def test_s3_reads_the_same_samples_as_local(digits_mds, s3_bucket, tmp_path):
    uri = f"s3://{s3_bucket}/digits"
    write_dataset(open_source("digits"), uri, "mds", shard_size=SHARD_SIZE, encoding="png")
    for split, batches in (("train", 8), ("heldout", 100)):
        with MDSLoader(_cfg(uri, tmp_path, num_workers=1), split, 64, seed=2) as remote, \
                MDSLoader(_cfg(digits_mds, tmp_path), split, 64, seed=2) as local:
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
def corrupt_mds(tmp_path_factory) -> tuple[Path, list[str], list[int]]:
    """60 digits per split in several shards; 3 of them with garbage instead of a PNG: (root, their keys, their
    indices)."""
    root = tmp_path_factory.mktemp("corrupt")
    samples = list(itertools.islice(open_source("digits").splits["train"](), 60))
    bad = {7, 31, 52}
    rows = [(key, b"\x89PNG garbage" + bytes(range(40)) if i in bad else encode_image(image, "png"), label)
            for i, (key, image, label) in enumerate(samples)]
    for split in ("train", "heldout"):
        _write_mds(root, split, rows)
    return root, [samples[i][0] for i in sorted(bad)], sorted(bad)


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_image_raises_naming_shard_and_key(corrupt_mds, tmp_path, workers):
    root, bad, _ = corrupt_mds
    with MDSLoader(_cfg(root, tmp_path, num_workers=workers), "heldout", 4, seed=0) as loader:
        with pytest.raises(CorruptSampleError) as info:
            list(loader)
    assert info.value.key == bad[0] and info.value.shard.startswith("shard.") and info.value.shard.endswith(".mds")
    assert bad[0] in str(info.value) and info.value.shard in str(info.value)


def test_skip_corrupt_leaves_out_and_counts(corrupt_mds, tmp_path):
    root, _, bad = corrupt_mds
    with MDSLoader(_cfg(root, tmp_path, skip_corrupt=True), "heldout", 4, seed=0) as loader:
        indices = _flat(list(loader))[0]
        assert loader.skipped_corrupt == 3 and indices == [i for i in range(60) if i not in bad]
    with MDSLoader(_cfg(root, tmp_path, skip_corrupt=True, num_workers=1), "train", 4, seed=0) as loader:
        assert loader.batches_per_epoch == 15  # all 60 samples are read each epoch
        batches = _take(loader, 15)
        indices = _flat(batches)[0]
        assert loader.skipped_corrupt == 3 and sorted(indices) == [i for i in range(60) if i not in bad]
        assert len(batches) == 15 and sum(len(b.indices) for b in batches) == 57  # 3 batches of 3, positions kept
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
    with pytest.raises(DataSourceError, match=r"shard\.00002\.mds has 100 bytes but .*manifest\.json lists"):
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
    with MDSLoader(_cfg(digits_mds, tmp_path), "train", 64, seed=0) as b:  # 96 samples used: not whole batches
        with pytest.raises(ValueError, match="96 samples of epoch 0 were used, which is not a whole number of steps"):
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
        assert isinstance(loader, MDSLoader) and loader.batches_per_epoch == 3 and loader.index_ordered
        tmp = loader.cache_dir
        x, y, i = next(iter(loader))
        assert x.shape == (64, 1, 8, 8) and y.shape == (64,) and i.tolist() == list(range(64))
    assert not Path(tmp).exists()  # the temporary cache goes with the loader


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
