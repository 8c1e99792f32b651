"""InMemoryLoader: order, data-parallel split, flips and exact resumption; build_loader over the embedded sets."""

import itertools

import numpy as np
import pytest
import torch

from data_pipeline import DataConfig, InMemoryLoader, build_loader, dataset_info, load_embedded, split_heldout

N = 53  # prime: no batch size or world size divides it


def _data(n: int = N) -> tuple[np.ndarray, np.ndarray]:
    """Random images whose label is their index, so every yielded sample can be traced back."""
    rng = np.random.RandomState(0)
    return rng.randint(0, 256, size=(n, 2, 3, 5), dtype=np.uint8), np.arange(n, dtype=np.int64)


def _train(**kw) -> InMemoryLoader:
    images, labels = _data()
    args = dict(seed=7, shuffle=True, repeat=True, drop_last=True, random_flip=False)
    args.update(kw)
    return InMemoryLoader(images, labels, args.pop("batch_size", 4), **args)


def _take(loader, k):
    return list(itertools.islice(iter(loader), k))


def _same(a, b):
    assert len(a) == len(b)
    for (xa, ya, ia), (xb, yb, ib) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ia, ib)


def _to_u8(x: torch.Tensor) -> np.ndarray:
    return torch.round((x + 1) * 127.5).to(torch.uint8).numpy()


def test_pixels_recover_integers_exactly_and_match_reference_normalisation():
    images = np.arange(256, dtype=np.uint8).reshape(4, 1, 8, 8)
    loader = InMemoryLoader(images, np.zeros(4, np.int64), 4, seed=0, shuffle=False, repeat=False, drop_last=False)
    (x, y, _), = list(loader)
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (4, 1, 8, 8)
    assert torch.equal(x, torch.from_numpy(images).float() / 255 * 2 - 1)
    assert np.array_equal(_to_u8(x), images)
    assert x.min() == -1 and x.max() == 1


def test_batches_are_the_samples_of_their_labels():
    images, _ = _data()
    for x, y, _ in _take(_train(), 20):
        assert x.shape == (4, 2, 3, 5)
        assert np.array_equal(_to_u8(x), images[y.numpy()])


def test_same_seed_same_batches_other_seed_or_epoch_other_order():
    _same(_take(_train(), 30), _take(_train(), 30))
    a = torch.cat([y for _, y, _ in _take(_train(), 13)])
    b = torch.cat([y for _, y, _ in _take(_train(seed=8), 13)])
    assert not torch.equal(a, b)
    loader = _train()
    assert loader.batches_per_epoch == 13  # 53 // 4
    epochs = [torch.cat([y for _, y, _ in _take(loader, 13)]) for _ in range(3)]
    for e in epochs:
        assert len(set(e.tolist())) == 52  # one sample (a different tail each epoch) dropped
    assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[1], epochs[2])
    assert loader.epoch == 2


def test_no_shuffle_is_natural_order():
    images, labels = _data()
    loader = InMemoryLoader(images, labels, 10, seed=3, shuffle=False, repeat=False, drop_last=False)
    assert torch.cat([y for _, y, _ in loader]).tolist() == list(range(N))


@pytest.mark.parametrize("k", [0, 1, 5, 13, 14, 30])  # 13 batches per epoch: 13 and 30 cross epoch boundaries
def test_resume_after_k_batches_matches_uninterrupted_run(k):
    total = 40
    reference = _take(_train(random_flip=True), total)
    first = _train(random_flip=True)
    head = _take(first, k)
    state = first.state_dict()
    assert all(type(v) is int for v in state.values())
    assert state["epoch"] * 13 + state["batches_in_epoch"] == k
    resumed = _train(random_flip=True)
    resumed.load_state_dict(state)
    _same(head + _take(resumed, total - k), reference)


def test_resume_mid_eval_epoch_and_two_rank_resume():
    images, labels = _data()
    kw = dict(seed=1, shuffle=False, repeat=False, drop_last=False)
    reference = list(InMemoryLoader(images, labels, 5, **kw))
    first = InMemoryLoader(images, labels, 5, **kw)
    head = _take(first, 4)
    resumed = InMemoryLoader(images, labels, 5, **kw)
    resumed.load_state_dict(first.state_dict())
    _same(head + list(resumed), reference)
    for rank in range(2):
        ref = _take(_train(rank=rank, world_size=2, random_flip=True), 20)
        a = _train(rank=rank, world_size=2, random_flip=True)
        head = _take(a, 9)
        b = _train(rank=rank, world_size=2, random_flip=True)
        b.load_state_dict(a.state_dict())
        _same(head + _take(b, 11), ref)


def test_flip_is_horizontal_per_sample_and_independent_of_world_size():
    images, _ = _data()

    def flips(loader, k):
        out = {}
        for x, y, _ in _take(loader, k):
            for img, label in zip(_to_u8(x), y.tolist()):
                original = images[label]
                if np.array_equal(img, original):
                    out[label] = False
                else:
                    assert np.array_equal(img, original[..., ::-1])
                    out[label] = True
        return out

    single = flips(_train(random_flip=True, batch_size=2), 26)  # epoch 0
    assert 0 < sum(single.values()) < len(single)
    assert not any(flips(_train(random_flip=False, batch_size=2), 26).values())
    both = {}
    for rank in range(2):
        both.update(flips(_train(random_flip=True, batch_size=1, rank=rank, world_size=2), 26))
    assert {k: single[k] for k in both if k in single} == {k: both[k] for k in both if k in single}
    assert len(set(both) & set(single)) >= 50


def test_two_ranks_train_disjoint_equal_batches():
    a, b = _train(rank=0, world_size=2), _train(rank=1, world_size=2)
    assert a.batches_per_epoch == b.batches_per_epoch == 6  # 53 // 8
    for _ in range(3):  # three epochs
        ya = torch.cat([y for _, y, _ in _take(a, 6)]).tolist()
        yb = torch.cat([y for _, y, _ in _take(b, 6)]).tolist()
        assert len(ya) == len(yb) == 24 and not set(ya) & set(yb) and len(set(ya + yb)) == 48


def test_two_ranks_eval_cover_every_sample_once():
    images, labels = _data()
    kw = dict(seed=0, shuffle=False, repeat=False, drop_last=False, world_size=2)
    ranks = [InMemoryLoader(images, labels, 4, rank=r, **kw) for r in range(2)]
    batches = [list(r) for r in ranks]
    assert [r.samples_per_epoch for r in ranks] == [27, 26]
    assert [len(b) for b in batches] == [r.batches_per_epoch for r in ranks] == [7, 7]
    assert [len(b[-1][1]) for b in batches] == [3, 2]  # last batches smaller
    seen = sorted(y for b in batches for _, ys, _ in b for y in ys.tolist())
    assert seen == list(range(N))
    # A rank can hold one batch fewer: 9 samples, batch 4 -> rank 0 has 5 (2 batches), rank 1 has 4 (1 batch).
    short = [InMemoryLoader(images[:9], labels[:9], 4, rank=r, **kw).batches_per_epoch for r in range(2)]
    assert short == [2, 1]


def test_non_repeating_loader_yields_one_epoch_per_loop():
    images, labels = _data()
    loader = InMemoryLoader(images, labels, 10, seed=2, shuffle=True, repeat=False, drop_last=False)
    first = torch.cat([y for _, y, _ in loader])
    second = torch.cat([y for _, y, _ in loader])
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(N))
    assert not torch.equal(first, second) and loader.epoch == 1


@pytest.mark.parametrize("change", [dict(seed=8), dict(shuffle=False)])
def test_mismatched_state_is_rejected(change):
    saved = _train()
    _take(saved, 3)
    key = next(iter(change))
    with pytest.raises(ValueError, match=key):
        _train(**change).load_state_dict(saved.state_dict())


def test_another_number_of_ranks_continues_from_the_same_sample():
    """3 steps of 4 on 1 rank used the epoch's first 12 samples; 2 ranks of 2, 1 rank of 6 go on from there."""
    saved = _train(batch_size=4)
    _take(saved, 3)
    state = saved.state_dict()
    rest = torch.cat([y for _, y, _ in _take(saved, 3)])  # the single rank's next 12 samples
    for world, batch in ((2, 2), (1, 6)):
        ranks = [_train(batch_size=batch, rank=r, world_size=world) for r in range(world)]
        for loader in ranks:
            loader.load_state_dict(state)
        taken = [torch.cat([y for _, y, _ in _take(loader, 12 // (world * batch))]) for loader in ranks]
        # Ranks interleave: rank r's k-th sample is the epoch's position k·W + r.
        assert torch.stack(taken, dim=1).flatten().tolist() == rest.tolist()
    with pytest.raises(ValueError, match=r"12 samples of epoch 0 were used, which is not a whole number"):
        _train(batch_size=5).load_state_dict(state)


def _step_sets(world: int, batch: int, steps: int, global_batch: int = 12) -> list[set[int]]:
    """The indices of each global step: every rank's micro-batches of that step together."""
    accumulation = global_batch // (world * batch)
    ranks = [iter(_train(batch_size=batch, rank=r, world_size=world, global_batch=global_batch))
             for r in range(world)]
    out = []
    for _ in range(steps):
        step = set()
        for it in ranks:
            for _ in range(accumulation):
                x, y, indices = next(it)
                assert torch.equal(indices, y)  # _data: a sample's label is its index
                step |= set(indices.tolist())
        assert len(step) == global_batch
        out.append(step)
    return out


def test_a_global_step_holds_the_same_samples_for_any_ranks_and_micro_batch():
    """53 samples, global batch 12: 4 steps an epoch (5 samples dropped), 10 steps cross two epoch boundaries."""
    reference = _step_sets(1, 12, 10)
    for world, batch in ((1, 6), (2, 6), (2, 3), (4, 3), (4, 1), (3, 2)):
        assert _step_sets(world, batch, 10) == reference, (world, batch)
    assert _train(batch_size=3, world_size=2, global_batch=12).batches_per_epoch == 4 * 2


def test_state_from_other_dataset_length_is_rejected():
    images, labels = _data(40)
    other = InMemoryLoader(images, labels, 4, seed=7, shuffle=True, repeat=True, drop_last=True)
    with pytest.raises(ValueError, match="num_samples"):
        _train().load_state_dict(other.state_dict())


def test_endless_loader_without_a_batch_is_rejected():
    images, labels = _data(5)
    with pytest.raises(ValueError, match="never yield"):
        InMemoryLoader(images, labels, 4, seed=0, shuffle=True, repeat=True, drop_last=True, world_size=2)


# -- build_loader / dataset_info -----------------------------------------------------------------------------------


def test_build_loader_train_and_heldout_follow_the_fixed_split():
    cfg = DataConfig(source="digits", heldout_fraction=0.1, split_seed=0)
    data = load_embedded("digits")
    train_idx, held_idx = split_heldout(1797, 0.1, 0)
    held = build_loader(cfg, "heldout", 64, seed=123)
    x = torch.cat([x for x, *_ in held])
    y = torch.cat([y for _, y, _ in held])
    assert np.array_equal(_to_u8(x), data.images[held_idx]) and np.array_equal(y.numpy(), data.labels[held_idx])
    # The held-out set does not depend on the training seed.
    assert torch.equal(torch.cat([x for x, *_ in build_loader(cfg, "heldout", 64, seed=5)]), x)
    train = build_loader(cfg, "train", 64, seed=123)
    assert train.batches_per_epoch == 1617 // 64
    held_set = {data.images[i].tobytes() for i in held_idx}
    xs = _take(train, train.batches_per_epoch + 3)  # endless: goes past one epoch
    assert len(xs) == train.batches_per_epoch + 3
    assert not any(img.tobytes() in held_set for xb, *_ in xs[:3] for img in _to_u8(xb))


def test_build_loader_photos_flip_and_ranks():
    cfg = DataConfig(source="photos", random_flip=True)
    loaders = [build_loader(cfg, "train", 16, seed=0, rank=r, world_size=2) for r in range(2)]
    (xa, *_), (xb, *_) = (next(iter(l)) for l in loaders)
    assert xa.shape == xb.shape == (16, 3, 32, 32)
    assert not any(torch.equal(a, b) for a in xa for b in xb)


def test_dataset_info_and_errors():
    assert dataset_info(DataConfig(source="digits")) == ((1, 8, 8), 10)
    assert dataset_info(DataConfig(source="photos")) == ((3, 32, 32), 7)
    with pytest.raises(ValueError, match=r"data.format='tfrecord' is not supported yet; choose one of \['embedded'"):
        build_loader(DataConfig(format="tfrecord"), "train", 8, seed=0)
    with pytest.raises(ValueError, match="data.uri is empty"):
        dataset_info(DataConfig(format="webdataset"))
    with pytest.raises(ValueError, match="split"):
        build_loader(DataConfig(), "test", 8, seed=0)
