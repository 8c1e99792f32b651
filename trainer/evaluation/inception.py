"""The FID Inception network: pool3 (2048-d) features of the TensorFlow "2015-12-05" Inception-v3 that FID is
defined with, as ported by pytorch-fid (``pt_inception-2015-12-05-6726825d.pth``).

Architecture
    torchvision's Inception-v3 layout (the same module and parameter names, 1008 output classes, no auxiliary
    head) with the FID variant's blocks, as pytorch-fid and torch-fidelity define them: in ``Mixed_5b/5c/5d``
    (FIDInceptionA), ``Mixed_6b..6e`` (FIDInceptionC) and ``Mixed_7b`` (FIDInceptionE, first) the pooling branch
    averages without counting the zero padding (TensorFlow's ``avg_pool``), and in ``Mixed_7c`` (second
    FIDInceptionE) the pooling branch is a 3×3 *max* pool. Convolutions have no bias; BatchNorm eps is 1e-3. The
    features are the global average pool after ``Mixed_7c`` ("pool3"); the classifier ``fc`` is loaded (so that the
    weights load strictly) but never used.

Preprocessing (the pytorch-fid convention)
    Images enter as uint8 in [0, 255] (model samples in [-1, 1] go through :func:`to_uint8`, the same rounding the
    PNG grids use, so generated and real images are quantised alike); they are scaled to [0, 1], 1-channel images
    are repeated to 3 channels (pytorch-fid reads files with ``PIL.Image.convert("RGB")``, which does the same),
    resized bilinearly to 299×299 (``F.interpolate(mode="bilinear", align_corners=False)``, no antialiasing,
    whatever the input size: 8×8 digits are upsampled, 256×256 images downsampled), then mapped to [-1, 1]
    (``2x − 1``) inside the network. Convolutions run in fp32 (TF32 is turned off for them on CUDA).

Weights
    They cannot be downloaded by this code. Fetch ``pt_inception-2015-12-05-6726825d.pth`` (~92 MB) from
    ``WEIGHTS_URL`` on a machine with internet access and point to it with ``--inception PATH``, the config key
    ``eval.inception_weights`` where the config has one, or ``$TARFLOW_INCEPTION_WEIGHTS``; a copy in torch hub's
    cache (``~/.cache/torch/hub/checkpoints/``, where pytorch-fid downloads it) is found by itself. Only these
    weights give FID numbers comparable with the literature.

``tiny_fid_inception()`` builds the same architecture with every channel count divided by 8, a 75×75 input and
random weights. It exists for plumbing tests only (its "FID" is not an FID; statistics it makes are marked as such
and cannot be mixed with real ones).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_FILE}"
WEIGHTS_ENV = "TARFLOW_INCEPTION_WEIGHTS"
TINY_PREFIX = "tiny-random"  # ``--inception tiny-random[:SEED]``: the plumbing stand-in, never for real numbers
INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008  # the TensorFlow graph's classifier (1000 ImageNet classes + 8 unused)

PREPROCESSING = ("uint8 [0,255] -> /255 -> 1-channel images repeated to 3 channels -> bilinear resize to "
                 "{size}x{size} (align_corners=False, no antialias) -> 2x-1; pool3 features (pytorch-fid "
                 "convention); generated images are clipped to [-1,1] and rounded to uint8 like the PNG grids")


class InceptionWeightsError(ValueError):
    """The FID Inception weights are missing or are not the FID Inception's."""


def missing_weights_message(where: str) -> str:
    return (f"FID Inception weights not found ({where}). They cannot be downloaded from here: on a machine with "
            f"internet access fetch {WEIGHTS_FILE} (~92 MB, the pytorch-fid port of the TensorFlow FID Inception) "
            f"from {WEIGHTS_URL}, copy it to this machine and pass --inception /path/to/{WEIGHTS_FILE} (or set "
            f"{WEIGHTS_ENV}=/path/to/{WEIGHTS_FILE}). If pytorch-fid has run on a machine, the file is in its "
            f"~/.cache/torch/hub/checkpoints/.")


# ---------------------------------------------------------------- preprocessing
def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Model-space images in [-1, 1] → uint8 ``round((clip(x, -1, 1) + 1) · 127.5)`` (round half to even), the
    mapping of the PNG grids. A loader's ``k/255·2 − 1`` comes back as exactly ``k``. NaN is not allowed here."""
    if images.dtype == torch.uint8:
        return images
    if not bool(torch.isfinite(images).all()):
        raise ValueError("to_uint8 got non-finite values; redraw or drop non-finite samples first")
    return torch.round((images.float().clamp(-1.0, 1.0) + 1.0) * 127.5).to(torch.uint8)


# ---------------------------------------------------------------- architecture
class BasicConv2d(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, **kwargs) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


class FIDInceptionA(nn.Module):
    """Mixed_5b/5c/5d: the pooling branch averages without counting the padding (TensorFlow's avg_pool)."""

    def __init__(self, in_channels: int, pool_features: int, s) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, s(64), kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, s(48), kernel_size=1)
        self.branch5x5_2 = BasicConv2d(s(48), s(64), kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, s(64), kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(s(64), s(96), kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(s(96), s(96), kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)
        self.out_channels = s(64) + s(64) + s(96) + pool_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    """Mixed_6a (unchanged from torchvision)."""

    def __init__(self, in_channels: int, s) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, s(384), kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, s(64), kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(s(64), s(96), kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(s(96), s(96), kernel_size=3, stride=2)
        self.out_channels = s(384) + s(96) + in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([b3, bd, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionC(nn.Module):
    """Mixed_6b..6e: pooling branch without the padding in the average."""

    def __init__(self, in_channels: int, channels_7x7: int, s) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, s(192), kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, s(192), kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, s(192), kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, s(192), kernel_size=1)
        self.out_channels = 4 * s(192)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        bp = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False))
        return torch.cat([b1, b7, bd, bp], 1)


class InceptionD(nn.Module):
    """Mixed_7a (unchanged from torchvision)."""

    def __init__(self, in_channels: int, s) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, s(192), kernel_size=1)
        self.branch3x3_2 = BasicConv2d(s(192), s(320), kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, s(192), kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(s(192), s(192), kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(s(192), s(192), kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(s(192), s(192), kernel_size=3, stride=2)
        self.out_channels = s(320) + s(192) + in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionE(nn.Module):
    """Mixed_7b (``pool="avg"``, without the padding in the average) and Mixed_7c (``pool="max"``: the FID graph
    max-pools here, where the paper and torchvision average)."""

    def __init__(self, in_channels: int, s, pool: str) -> None:
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, s(320), kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, s(384), kernel_size=1)
        self.branch3x3_2a = BasicConv2d(s(384), s(384), kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(s(384), s(384), kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, s(448), kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(s(448), s(384), kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(s(384), s(384), kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(s(384), s(384), kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, s(192), kernel_size=1)
        self.out_channels = s(320) + 4 * s(384) + s(192)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        if self.pool == "max":
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
        return torch.cat([b1, b3, bd, self.branch_pool(pooled)], 1)


class FIDInception(nn.Module):
    """``features = net(images_uint8)``: (B, 1 or 3, H, W) uint8 → pool3 features (B, feature_dim) float32.

    ``width_divisor`` (1, 2, 4, 8 or 16) divides every channel count (1: the real network, 2048-d features);
    ``input_size`` is the side images are resized to (299 for the real network; at least 75).
    ``identity`` names the weights (set by the loaders); statistics record it so that features of different
    networks are never compared."""

    def __init__(self, width_divisor: int = 1, input_size: int = INPUT_SIZE) -> None:
        super().__init__()
        if width_divisor not in (1, 2, 4, 8, 16):
            raise ValueError(f"width_divisor must be 1, 2, 4, 8 or 16, got {width_divisor}")
        if input_size < 75:
            raise ValueError(f"Inception-v3 needs inputs of at least 75x75, got input_size={input_size}")
        self.width_divisor = width_divisor
        self.input_size = input_size
        self.identity = f"random-init(width/{width_divisor}, {input_size}px)"

        def s(c: int) -> int:
            return c // width_divisor

        self.Conv2d_1a_3x3 = BasicConv2d(3, s(32), kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(s(32), s(32), kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(s(32), s(64), kernel_size=3, padding=1)
        self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = BasicConv2d(s(64), s(80), kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(s(80), s(192), kernel_size=3)
        self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = FIDInceptionA(s(192), pool_features=s(32), s=s)
        self.Mixed_5c = FIDInceptionA(self.Mixed_5b.out_channels, pool_features=s(64), s=s)
        self.Mixed_5d = FIDInceptionA(self.Mixed_5c.out_channels, pool_features=s(64), s=s)
        self.Mixed_6a = InceptionB(self.Mixed_5d.out_channels, s=s)
        self.Mixed_6b = FIDInceptionC(self.Mixed_6a.out_channels, channels_7x7=s(128), s=s)
        self.Mixed_6c = FIDInceptionC(self.Mixed_6b.out_channels, channels_7x7=s(160), s=s)
        self.Mixed_6d = FIDInceptionC(self.Mixed_6c.out_channels, channels_7x7=s(160), s=s)
        self.Mixed_6e = FIDInceptionC(self.Mixed_6d.out_channels, channels_7x7=s(192), s=s)
        self.Mixed_7a = InceptionD(self.Mixed_6e.out_channels, s=s)
        self.Mixed_7b = FIDInceptionE(self.Mixed_7a.out_channels, s=s, pool="avg")
        self.Mixed_7c = FIDInceptionE(self.Mixed_7b.out_channels, s=s, pool="max")
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(self.Mixed_7c.out_channels, NUM_CLASSES)  # loaded, never used: features are pool3
        self.feature_dim = self.Mixed_7c.out_channels
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 1|3, H, W) → float32 (B, 3, S, S) in [-1, 1] as the network expects (see the module doc)."""
        if images.dtype != torch.uint8:
            raise ValueError(f"FIDInception takes uint8 images in [0, 255], got {images.dtype}; convert model "
                             f"outputs in [-1, 1] with trainer.evaluation.inception.to_uint8")
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images of shape (B, 1 or 3, H, W), got {tuple(images.shape)}")
        x = images.to(self.fc.weight.device, torch.float32) / 255.0
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return 2.0 * x - 1.0

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(images)
        with _fp32_convolutions(x.device):
            for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
                         "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                         "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool"):
                x = getattr(self, name)(x)
        return torch.flatten(x, 1)

    def train(self, mode: bool = True) -> "FIDInception":
        return super().train(False)  # BatchNorm always uses its running statistics


@contextlib.contextmanager
def _fp32_convolutions(device: torch.device):
    """No TF32 in cuDNN convolutions while features are computed (the reference numbers are fp32)."""
    saved = None
    if device.type == "cuda":
        try:
            saved = torch.backends.cudnn.allow_tf32
            torch.backends.cudnn.allow_tf32 = False
        except RuntimeError:  # torch refuses the legacy flag once its fp32_precision API is in use: leave it be
            saved = None
    try:
        yield
    finally:
        if saved is not None:
            torch.backends.cudnn.allow_tf32 = saved


# ---------------------------------------------------------------- construction and weights
def tiny_fid_inception(seed: int = 0) -> FIDInception:
    """The architecture at 1/8 width (256-d features) and 75×75 input, with random weights: plumbing tests only."""
    net = random_init(FIDInception(width_divisor=8, input_size=75), seed)
    net.identity = f"{TINY_PREFIX}:{seed} (random weights, width/8, 75px; NOT the FID Inception)"
    return net


@torch.no_grad()
def random_init(net: FIDInception, seed: int) -> FIDInception:
    """Random weights that keep activations alive through the ~50 layers (He-normal convolutions, BatchNorm near the
    identity), so that features depend on the image; from ``seed``, leaving the global RNG alone."""
    generator = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            fan_in = m.weight[0].numel()
            m.weight.copy_(torch.randn(m.weight.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=generator))
            m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=generator))
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=generator))
            m.running_var.copy_(1 + 0.2 * torch.rand(m.running_var.shape, generator=generator))
        elif isinstance(m, nn.Linear):
            m.weight.copy_(torch.randn(m.weight.shape, generator=generator) / m.in_features ** 0.5)
            m.bias.zero_()
    return net


def resolve_weights_path(cli: str | None = None, config: str | None = None) -> str:
    """The first of: ``--inception``, the config's ``eval.inception_weights``, ``$TARFLOW_INCEPTION_WEIGHTS``, torch
    hub's cache. An error that says where to get the file when none is given or present."""
    for value in (cli, config, os.environ.get(WEIGHTS_ENV)):
        if value:
            return value
    cached = Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE
    if cached.is_file():
        return str(cached)
    raise InceptionWeightsError(missing_weights_message(
        f"no --inception path, no eval.inception_weights, {WEIGHTS_ENV} unset, nothing at {cached}"))


def load_fid_inception(path: str, device: torch.device | str = "cpu") -> FIDInception:
    """The FID Inception with the weights at ``path`` (a file, or a directory holding ``WEIGHTS_FILE``), or the
    plumbing stand-in for ``tiny-random[:SEED]``. Wrong or missing files are an :class:`InceptionWeightsError`."""
    if path.startswith(TINY_PREFIX):
        seed = path[len(TINY_PREFIX):].lstrip(":")
        if seed and not seed.isdigit():
            raise InceptionWeightsError(f"--inception {path!r}: expected {TINY_PREFIX} or {TINY_PREFIX}:SEED")
        return tiny_fid_inception(int(seed or 0)).to(device)
    file = Path(path).expanduser()
    if file.is_dir():
        file = file / WEIGHTS_FILE
    if not file.is_file():
        raise InceptionWeightsError(missing_weights_message(f"{file} does not exist"))
    digest = hashlib.sha256(file.read_bytes()).hexdigest()
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, or not a torch file
        raise InceptionWeightsError(f"{file} is not readable as a PyTorch state dict ({type(e).__name__}: {e}); "
                                    f"expected {WEIGHTS_FILE} from {WEIGHTS_URL}") from None
    net = FIDInception()
    load_weights(net, state, where=str(file))
    net.identity = f"{WEIGHTS_FILE.removesuffix('.pth')} sha256:{digest[:16]}"
    return net.to(device)


def load_weights(net: FIDInception, state: Mapping[str, torch.Tensor], where: str = "state dict") -> None:
    """Strict load, except that BatchNorm's ``num_batches_tracked`` counters may be absent; a wrong key or shape
    names it."""
    if not isinstance(state, Mapping):
        raise InceptionWeightsError(f"{where} holds a {type(state).__name__}, not a state dict")
    expected = net.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected
                  else f"{wrong[0][0]} has shape {wrong[0][1]}, expected {wrong[0][2]}")
        raise InceptionWeightsError(f"{where} does not hold the FID Inception weights ({detail}); expected "
                                    f"{WEIGHTS_FILE} from {WEIGHTS_URL}")
    net.load_state_dict({k: v for k, v in state.items()}, strict=False)

