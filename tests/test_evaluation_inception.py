"""The FID networks of the two conventions: each is its library's own network with the weights file of its own
layout, fed as the library (and, for the paper convention, the official TarFlow code) feeds it; where they differ.

Random weights in each library's layout stand in (``fid_weights``, built once per session): these tests check the
plumbing and the conventions, not FID values (real numbers need the real weights)."""

import pytest
import torch
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torchmetrics.image.fid import FrechetInceptionDistance

from tarflow.main import main
from trainer.evaluation.inception import (
    PAPER,
    PYTORCH_FID,
    WEIGHTS,
    WEIGHTS_ENV,
    InceptionWeightsError,
    load_fid_network,
    official_resize,
    paper_input,
    resolve_weights_path,
    to_uint8,
)


@pytest.fixture(scope="module")
def networks(fid_weights):
    return {c: load_fid_network(str(fid_weights), c) for c in (PAPER, PYTORCH_FID)}


def digits(n: int = 4) -> torch.Tensor:
    """Model-space images as the loaders yield them: k/255·2 − 1."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 1, 8, 8), generator=g).float() / 255 * 2 - 1


def test_each_convention_is_its_librarys_network_with_its_weights_file(networks, fid_weights):
    paper, pfid = networks[PAPER], networks[PYTORCH_FID]
    assert isinstance(paper.metric, FrechetInceptionDistance) and paper.metric.normalize
    assert isinstance(paper.metric.inception, FeatureExtractorInceptionV3)
    from pytorch_fid.inception import InceptionV3

    assert isinstance(pfid.net, InceptionV3)
    for convention, conv in ((PAPER, paper.metric.inception.Conv2d_1a_3x3), (PYTORCH_FID, pfid.net.blocks[0][0])):
        saved = torch.load(fid_weights / WEIGHTS[convention].name, weights_only=True)
        assert torch.equal(conv.conv.weight, saved["Conv2d_1a_3x3.conv.weight"])
    for net in networks.values():
        f = net.features(digits())
        assert f.shape == (4, 2048) and f.dtype == torch.float32 and torch.isfinite(f).all()
        assert float(f.std(0).mean()) > 1e-3 * float(f.abs().mean())  # random but not degenerate weights
    assert paper.identity.startswith("weights-inception-2015-12-05-6726825d sha256:")
    assert pfid.identity.startswith("pt_inception-2015-12-05-6726825d sha256:")


@torch.no_grad()
def test_paper_features_are_what_torchmetrics_update_accumulates(networks, fid_weights):
    """FrechetInceptionDistance(normalize=True).update(0.5·(clip(x)+1)), as evaluate_fid.py calls it."""
    x = digits(6) * 1.2  # some values outside [-1, 1]: clipped first
    metric = FrechetInceptionDistance(normalize=True, **official_resize(),  # the official code's torchmetrics 1.6
                                      feature_extractor_weights_path=str(fid_weights / WEIGHTS[PAPER].name))
    metric.update(0.5 * (x.clip(-1, 1) + 1).repeat(1, 3, 1, 1), real=True)
    ours = networks[PAPER].features(x).double()
    torch.testing.assert_close(metric.real_features_sum, ours.sum(0), rtol=0, atol=0)
    torch.testing.assert_close(metric.real_features_cov_sum, ours.T @ ours, rtol=0, atol=0)


@torch.no_grad()
def test_pytorch_fid_features_are_the_librarys_from_torch_hubs_cache(networks, fid_weights, tmp_path, monkeypatch):
    """pytorch-fid loading its own file from torch hub's cache, fed uint8/255 images repeated to RGB."""
    from pytorch_fid.inception import InceptionV3

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / WEIGHTS[PYTORCH_FID].name).symlink_to(fid_weights / WEIGHTS[PYTORCH_FID].name)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    assert resolve_weights_path(None, None, PYTORCH_FID) == str(tmp_path / "checkpoints" / WEIGHTS[PYTORCH_FID].name)
    library = InceptionV3([3]).eval()  # its own loading: load_state_dict_from_url finds the cached file
    x = digits(3)
    expected = library((to_uint8(x).float() / 255).repeat(1, 3, 1, 1))[0].flatten(1)
    torch.testing.assert_close(networks[PYTORCH_FID].features(x), expected, rtol=0, atol=0)


@torch.no_grad()
def test_the_conventions_quantise_and_resize_differently(networks):
    paper, pfid = networks[PAPER], networks[PYTORCH_FID]
    # an image whose values sit between two levels: paper truncates (x·255).byte(), pytorch-fid rounds
    level = torch.full((1, 1, 8, 8), 100.0)
    between = ((level + 0.7) / 255) * 2 - 1
    at = {k: (torch.full_like(level, float(k)) / 255) * 2 - 1 for k in (100, 101)}
    assert (paper_input(between) * 255).byte().unique().tolist() == [100]
    assert to_uint8(between).unique().tolist() == [101]
    paper_between = paper.features(between)
    torch.testing.assert_close(paper_between, paper.features(at[100]), rtol=0, atol=0)
    torch.testing.assert_close(pfid.features(between), pfid.features(at[101]), rtol=0, atol=0)
    assert not torch.equal(paper_between, paper.features(at[101]))
    # the same images, the same weights (the two layouts hold the same tensors here): other features, from the
    # resize (torch-fidelity's TF1-compatible bilinear vs F.interpolate) and the input scaling
    x = digits(2)
    a, b = paper.features(x), pfid.features(x)
    assert a.shape == b.shape and not torch.allclose(a, b, rtol=1e-3, atol=1e-5)


def test_weights_resolution_for_each_convention(fid_weights, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    for convention in (PAPER, PYTORCH_FID):
        with pytest.raises(InceptionWeightsError) as e:
            resolve_weights_path(None, None, convention)
        for part in (WEIGHTS[convention].name, WEIGHTS[convention].url, "--inception", WEIGHTS_ENV,
                     "cannot be downloaded"):
            assert part in str(e.value)
        with pytest.raises(InceptionWeightsError, match=WEIGHTS[convention].name):
            load_fid_network(str(tmp_path / "nowhere.pth"), convention)
    monkeypatch.setenv(WEIGHTS_ENV, str(fid_weights))
    assert resolve_weights_path(None, None, PAPER) == str(fid_weights)
    assert resolve_weights_path("/cli.pth", "/config.pth", PAPER) == "/cli.pth"
    assert resolve_weights_path(None, "/config.pth", PAPER) == "/config.pth"
    # the pytorch-fid file is refused by the paper convention only when its layout differs: ours are random tensors
    # of each library's own state dict, so a file of the wrong layout names the first difference
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    for convention in (PAPER, PYTORCH_FID):
        with pytest.raises(InceptionWeightsError, match="not .*Inception weights"):
            load_fid_network(str(tmp_path / "other.pth"), convention)
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(InceptionWeightsError):
        load_fid_network(str(tmp_path / "text.pth"), PYTORCH_FID)
    # through the command: exit code 2 and the same advice
    code = main(["eval", "stats", "digits", "--inception", str(tmp_path / "nowhere.pth"), "--out",
                 str(tmp_path / "s.pth"), "--device", "cpu"])
    assert code == 2 and WEIGHTS[PAPER].url in capsys.readouterr().err
    with pytest.raises(ValueError, match="--fid-convention must be one of paper, pytorch-fid"):
        load_fid_network(str(fid_weights), "clean-fid")


def test_the_random_stand_in_is_a_small_seeded_network_with_each_conventions_quantisation():
    x = digits(4)
    for convention in (PAPER, PYTORCH_FID):
        a, b = load_fid_network("tiny-random:1", convention), load_fid_network("tiny-random:2", convention)
        assert "NOT the FID Inception" in a.identity and a.convention == convention and a.feature_dim == 64
        fa = a.features(x)
        assert fa.shape == (4, 64) and fa.std(0).min() > 0  # features vary with the image
        torch.testing.assert_close(load_fid_network("tiny-random:1", convention).features(x), fa)
        assert not torch.equal(fa, b.features(x))
        assert a.stats_state() == {}  # its statistics files carry no network weights
    # a value 70% of the way from level 100 to 101: the paper convention truncates to 100, pytorch-fid rounds to 101
    level = lambda k: torch.full((1, 1, 8, 8), 2 * k / 255 - 1)  # noqa: E731
    paper, pytorch_fid = load_fid_network("tiny-random:1", PAPER), load_fid_network("tiny-random:1", PYTORCH_FID)
    torch.testing.assert_close(paper.features(level(100.7)), paper.features(level(100)))
    torch.testing.assert_close(pytorch_fid.features(level(100.7)), pytorch_fid.features(level(101)))
    assert not torch.equal(paper.features(level(100.7)), pytorch_fid.features(level(100.7)))
    with pytest.raises(InceptionWeightsError, match="expected tiny-random or tiny-random:SEED"):
        load_fid_network("tiny-random:x")
