"""The FID Inception: the architecture the pytorch-fid weights load into, its features, weight loading and errors.

Random weights stand in everywhere here: these tests check the plumbing and the architecture, not FID values (real
numbers need the real pt_inception-2015-12-05-6726825d.pth)."""

import re

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torchvision.models import inception as tv

from tarflow.main import main
from trainer.evaluation.inception import (
    WEIGHTS_ENV,
    WEIGHTS_FILE,
    WEIGHTS_URL,
    FIDInception,
    InceptionWeightsError,
    load_fid_inception,
    random_init,
    resolve_weights_path,
    tiny_fid_inception,
    to_uint8,
)


# ---- pytorch-fid's construction (src/pytorch_fid/inception.py), rebuilt here as the reference: torchvision's
# Inception-v3 with 1008 classes and no aux head, four block types patched.
class _A(tv.InceptionA):
    def forward(self, x):
        pool = self.branch_pool(F.avg_pool2d(x, 3, 1, 1, count_include_pad=False))
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))), pool], 1)


class _C(tv.InceptionC):
    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(self.branch7x7dbl_2(
            self.branch7x7dbl_1(x)))))
        pool = self.branch_pool(F.avg_pool2d(x, 3, 1, 1, count_include_pad=False))
        return torch.cat([self.branch1x1(x), b7, bd, pool], 1)


class _E(tv.InceptionE):
    def __init__(self, in_channels, max_pool):
        super().__init__(in_channels)
        self.max_pool = max_pool

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = (F.max_pool2d(x, 3, 1, 1) if self.max_pool
                  else F.avg_pool2d(x, 3, 1, 1, count_include_pad=False))
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


def pytorch_fid_inception() -> torchvision.models.Inception3:
    net = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, init_weights=False, weights=None)
    net.Mixed_5b, net.Mixed_5c, net.Mixed_5d = _A(192, 32), _A(256, 64), _A(288, 64)
    net.Mixed_6b, net.Mixed_6c, net.Mixed_6d, net.Mixed_6e = _C(768, 128), _C(768, 160), _C(768, 160), _C(768, 192)
    net.Mixed_7b, net.Mixed_7c = _E(1280, max_pool=False), _E(2048, max_pool=True)
    return net.eval()


def pytorch_fid_features(net, images_01: torch.Tensor) -> torch.Tensor:
    """pytorch-fid's InceptionV3 wrapper (resize_input, normalize_input, output block 3) on RGB images in [0, 1]."""
    x = 2 * F.interpolate(images_01, size=(299, 299), mode="bilinear", align_corners=False) - 1
    for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                 "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                 "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool"):
        x = getattr(net, name)(x)
    return x.flatten(1)


def test_the_pytorch_fid_weights_layout_loads_strictly():
    ours, theirs = FIDInception().state_dict(), pytorch_fid_inception().state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)
    assert FIDInception().feature_dim == 2048


@torch.no_grad()
def test_pool3_features_equal_pytorch_fids_on_the_same_weights():
    net = random_init(FIDInception(), seed=0)
    reference = pytorch_fid_inception()
    reference.load_state_dict(net.state_dict(), strict=True)
    rgb = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    grey = torch.randint(0, 256, (1, 1, 8, 8), dtype=torch.uint8)
    ours = torch.cat([net(rgb), net(grey)])
    expected = torch.cat([pytorch_fid_features(reference, rgb.float() / 255),
                          # pytorch-fid reads files with PIL's convert("RGB"): grey repeated to 3 channels
                          pytorch_fid_features(reference, grey.float().div(255).repeat(1, 3, 1, 1))])
    assert ours.shape == (2, 2048) and float(ours.std(0).mean()) > 0  # the features depend on the image
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def test_the_tiny_stand_in_is_the_same_architecture_smaller():
    net = tiny_fid_inception(seed=1)
    assert (net.feature_dim, net.input_size) == (256, 75) and "NOT the FID Inception" in net.identity
    names = [k for k in FIDInception().state_dict()]
    assert list(net.state_dict()) == names
    grey = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    f = net(grey)
    assert f.shape == (5, 256) and torch.isfinite(f).all() and float(f.std(0).max()) > 0
    torch.testing.assert_close(net(grey.repeat(1, 3, 1, 1)), f, rtol=0, atol=0)  # grey = repeated RGB
    torch.testing.assert_close(tiny_fid_inception(seed=1)(grey), f, rtol=0, atol=0)  # deterministic
    assert not torch.equal(tiny_fid_inception(seed=2)(grey), f)
    assert load_fid_inception("tiny-random:1").identity == net.identity
    with pytest.raises(ValueError, match="takes uint8 images"):
        net(grey.float())


def test_to_uint8_inverts_the_loaders_normalisation_and_clips():
    k = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(to_uint8(k.float() / 255 * 2 - 1), k)
    assert to_uint8(torch.tensor([-3.0, 3.0, 0.0])).tolist() == [0, 255, 128]  # 127.5 rounds half to even
    with pytest.raises(ValueError, match="non-finite"):
        to_uint8(torch.tensor([float("nan")]))


def test_weights_load_from_a_file_or_its_directory(tmp_path):
    net = random_init(FIDInception(), seed=3)
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / WEIGHTS_FILE)  # the counters may be absent from a port
    loaded = load_fid_inception(str(tmp_path))  # a directory: the file of that name inside
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in state.items())
    assert re.fullmatch(r"pt_inception-2015-12-05-6726825d sha256:[0-9a-f]{16}", loaded.identity)


def test_missing_weights_say_where_to_get_them(tmp_path, monkeypatch, capsys):
    with pytest.raises(InceptionWeightsError) as e:
        load_fid_inception(str(tmp_path / "nowhere.pth"))
    message = str(e.value)
    for part in (WEIGHTS_FILE, WEIGHTS_URL, "--inception", WEIGHTS_ENV, "cannot be downloaded"):
        assert part in message
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(InceptionWeightsError, match="no --inception path"):
        resolve_weights_path(None, None)
    monkeypatch.setenv(WEIGHTS_ENV, "/from/env.pth")
    assert resolve_weights_path(None, None) == "/from/env.pth"
    assert resolve_weights_path("/cli.pth", "/config.pth") == "/cli.pth"
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / WEIGHTS_FILE).write_bytes(b"")
    monkeypatch.delenv(WEIGHTS_ENV)
    assert resolve_weights_path(None, None) == str(tmp_path / "hub" / "checkpoints" / WEIGHTS_FILE)
    # through the command: exit code 2 and the same advice
    code = main(["eval", "stats", "digits", "--inception", str(tmp_path / "nowhere.pth"), "--out",
                 str(tmp_path / "s.npz"), "--device", "cpu"])
    assert code == 2 and WEIGHTS_URL in capsys.readouterr().err


def test_other_weights_are_refused_naming_the_difference(tmp_path):
    torchvision_inception = torchvision.models.inception_v3(aux_logits=False, init_weights=False, weights=None)
    torch.save(torchvision_inception.state_dict(), tmp_path / "imagenet.pth")  # 1000 classes
    with pytest.raises(InceptionWeightsError, match=r"fc.weight has shape \(1000, 2048\), expected \(1008, 2048\)"):
        load_fid_inception(str(tmp_path / "imagenet.pth"))
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(InceptionWeightsError, match="does not hold the FID Inception weights"):
        load_fid_inception(str(tmp_path / "other.pth"))
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(InceptionWeightsError, match="not readable as a PyTorch state dict"):
        load_fid_inception(str(tmp_path / "text.pth"))
