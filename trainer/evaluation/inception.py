"""The FID feature extractors, one per convention, each the network and the preprocessing of the library that
defines it. Features are the 2048-d pool3 activations of the TensorFlow "2015-12-05" Inception-v3.

``paper`` (the default): as the official TarFlow code (apple/ml-tarflow, ``utils.FID``, ``evaluate_fid.py``,
``prepare_fid_stats.py``) measures it: torchmetrics' ``FrechetInceptionDistance(normalize=True)``, whose feature
extractor is torch-fidelity's ``FeatureExtractorInceptionV3``, fed float images ``0.5 · (clip(x, −1, 1) + 1)``.
torchmetrics turns them into uint8 by truncation, ``(x · 255).byte()`` (a value between two levels goes down), and
torch-fidelity's TensorFlow-1.x-compatible bilinear resize brings them to 299×299, then ``(x − 128)/128``.
Weights: torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``. Later torchmetrics releases made an
antialiased ``F.interpolate`` the default resize (``antialias=True``); the official code pinned torchmetrics 1.6,
whose only resize was torch-fidelity's, so the metric is built with ``antialias=False`` where that argument exists.

``pytorch-fid``: the ``pytorch-fid`` package's ``InceptionV3`` (``resize_input``: ``F.interpolate`` bilinear,
``align_corners=False``; ``normalize_input``: ``2x − 1``), fed uint8 images rounded as the PNG grids are,
``round((clip(x, −1, 1) + 1) · 127.5)``, divided by 255. Weights: ``pt_inception-2015-12-05-6726825d.pth``.

In both, 1-channel images are repeated to 3 channels (what PIL's ``convert("RGB")`` does to a grey file).

Weights cannot be downloaded by this code: give the file (``--inception PATH``, ``eval.inception_weights``,
``$TARFLOW_INCEPTION_WEIGHTS``; a directory holding the convention's file name also works, so one directory can
serve both conventions), or put it in torch hub's cache (``~/.cache/torch/hub/checkpoints/``), where each library
downloads it to. ``tiny-random[:SEED]`` is a stand-in for plumbing (``TinyRandomNetwork``): the convention's
quantisation, then a small fixed random projection — milliseconds instead of the Inception's ~0.3 s per image on a
CPU, never an FID; statistics it makes are marked so and cannot be mixed with real ones.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping
from unittest import mock

import torch

PAPER, PYTORCH_FID = "paper", "pytorch-fid"
CONVENTIONS = (PAPER, PYTORCH_FID)
DEFAULT_CONVENTION = PAPER
WEIGHTS_ENV = "TARFLOW_INCEPTION_WEIGHTS"
TINY_PREFIX = "tiny-random"  # ``--inception tiny-random[:SEED]``: the plumbing stand-in, never for real numbers
FEATURE_DIM = 2048
TINY_FEATURE_DIM = 64  # the plumbing stand-in's features


@dataclass(frozen=True)
class WeightsFile:
    name: str
    url: str
    library: str


WEIGHTS = {
    PAPER: WeightsFile("weights-inception-2015-12-05-6726825d.pth",
                       "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                       "weights-inception-2015-12-05-6726825d.pth", "torch-fidelity (used by torchmetrics)"),
    PYTORCH_FID: WeightsFile("pt_inception-2015-12-05-6726825d.pth",
                             "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                             "pt_inception-2015-12-05-6726825d.pth", "pytorch-fid"),
}

PREPROCESSING = {
    PAPER: ("float 0.5*(clip(x,-1,1)+1) -> torchmetrics FrechetInceptionDistance(normalize=True): (x*255).byte() "
            "(truncation) -> 1-channel repeated to 3 -> torch-fidelity FeatureExtractorInceptionV3 (its own "
            "TF1-compatible bilinear resize to 299x299, (x-128)/128); pool3 2048-d (paper convention)"),
    PYTORCH_FID: ("uint8 round((clip(x,-1,1)+1)*127.5) (as the PNG grids) -> /255 -> 1-channel repeated to 3 -> "
                  "pytorch-fid InceptionV3 (F.interpolate bilinear 299x299, align_corners=False; 2x-1); pool3 "
                  "2048-d (pytorch-fid convention)"),
}


class InceptionWeightsError(ValueError):
    """The FID Inception weights are missing or are not the convention's network's."""


def check_convention(convention: str) -> str:
    if convention not in CONVENTIONS:
        raise ValueError(f"--fid-convention must be one of {', '.join(CONVENTIONS)}, got {convention!r}")
    return convention


def missing_weights_message(where: str, convention: str) -> str:
    w = WEIGHTS[convention]
    return (f"FID Inception weights not found ({where}). They cannot be downloaded from here: the {convention} "
            f"convention uses {w.library}'s {w.name} (~92 MB); on a machine with internet access fetch it from "
            f"{w.url}, copy it to this machine and pass --inception /path/to/{w.name} (or set "
            f"{WEIGHTS_ENV}=/path/to/{w.name}, or put it in ~/.cache/torch/hub/checkpoints/).")


# ---------------------------------------------------------------- the two feedings
def _rgb(x: torch.Tensor) -> torch.Tensor:
    return x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x


def _checked(images: torch.Tensor) -> torch.Tensor:
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images (B, 1 or 3, H, W), got {tuple(images.shape)}")
    if images.dtype == torch.uint8 or not bool(torch.isfinite(images).all()):
        raise ValueError("FID features take finite float images in [-1, 1] (model space); redraw or drop "
                         "non-finite samples first")
    return images.float()


def paper_input(images: torch.Tensor) -> torch.Tensor:
    """What the official code passes to ``FrechetInceptionDistance.update``: ``0.5 · (clip(x, −1, 1) + 1)``."""
    return 0.5 * (_checked(images).clamp(-1.0, 1.0) + 1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Model-space images in [-1, 1] → uint8 ``round((clip(x, -1, 1) + 1) · 127.5)`` (round half to even), the
    mapping of the PNG grids and of the pytorch-fid convention. A loader's ``k/255·2 − 1`` comes back as ``k``."""
    if images.dtype == torch.uint8:
        return images
    if not bool(torch.isfinite(images).all()):
        raise ValueError("to_uint8 got non-finite values; redraw or drop non-finite samples first")
    return torch.round((images.float().clamp(-1.0, 1.0) + 1.0) * 127.5).to(torch.uint8)


# ---------------------------------------------------------------- the networks
class FIDNetwork:
    """``features(images)``: model-space float images (B, C, H, W) in [-1, 1] → (B, 2048) float32 features."""

    convention: str
    identity: str  # the network's identity, as statistics files record it
    feature_dim = FEATURE_DIM
    weights_digest: str | None = None  # of the loaded tensors (paper: official stats files embed the weights)

    def stats_state(self) -> dict[str, torch.Tensor]:
        """What a statistics file of this convention embeds of the network (the official ``.pth`` holds the metric's
        whole state dict, the Inception's weights under ``inception.``)."""
        return {}

    @property
    def preprocessing(self) -> str:
        return PREPROCESSING[self.convention]

    def features(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class PaperNetwork(FIDNetwork):
    """torchmetrics' ``FrechetInceptionDistance(feature=2048, normalize=True)``; its ``inception`` is torch-fidelity's
    extractor. ``features`` is the first half of the metric's ``update``: ``(x · 255).byte()``, then the network."""

    convention = PAPER

    def __init__(self, weights_file: str, identity: str, device: torch.device | str = "cpu") -> None:
        from torchmetrics.image.fid import FrechetInceptionDistance

        try:
            self.metric = FrechetInceptionDistance(feature=FEATURE_DIM, normalize=True, sync_on_compute=False,
                                                   feature_extractor_weights_path=weights_file,
                                                   **official_resize()).to(device)
        except (RuntimeError, KeyError, ValueError) as e:
            raise InceptionWeightsError(f"{identity}: not torch-fidelity's Inception weights ({_first_line(e)})") \
                from None
        self.identity = identity
        self.device = torch.device(device)
        self.weights_digest = weights_digest(self.metric.inception.state_dict())

    def stats_state(self) -> dict[str, torch.Tensor]:
        return {f"inception.{k}": v.cpu() for k, v in self.metric.inception.state_dict().items()}

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        pixels = (_rgb(paper_input(images)).to(self.device) * 255).byte()  # FrechetInceptionDistance(normalize=True)
        return self.metric.inception(pixels)


class PytorchFidNetwork(FIDNetwork):
    """pytorch-fid's ``InceptionV3([3])`` (resize and normalisation on), weights loaded from a local state dict."""

    convention = PYTORCH_FID

    def __init__(self, state: Mapping[str, torch.Tensor], identity: str, device: torch.device | str = "cpu") -> None:
        from pytorch_fid import inception as pytorch_fid

        # pytorch-fid fetches its weights with load_state_dict_from_url (a download, or torch hub's cache): hand it
        # the local state dict instead; it loads it strictly into its FID Inception.
        try:
            with mock.patch.object(pytorch_fid, "load_state_dict_from_url", lambda *a, **k: state):
                net = pytorch_fid.InceptionV3([pytorch_fid.InceptionV3.BLOCK_INDEX_BY_DIM[FEATURE_DIM]])
        except (RuntimeError, KeyError) as e:
            raise InceptionWeightsError(f"{identity}: not pytorch-fid's FID Inception weights ({_first_line(e)})") \
                from None
        self.net = net.to(device).eval()
        self.identity = identity
        self.device = torch.device(device)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = _rgb(to_uint8(_checked(images)).to(self.device).float() / 255.0)
        return self.net(x)[0].flatten(1)


class TinyRandomNetwork(FIDNetwork):
    """``tiny-random[:SEED]``: the plumbing stand-in of a convention. Its quantisation (paper: truncation, pytorch-fid:
    rounding), grey → RGB, a bilinear resize to 16×16, then a fixed random projection (from ``seed``) through a tanh
    to 64 features, which vary with the image. Exercises everything around the network (sampling plan, sums across
    ranks, files, provenance checks) at no cost; never an FID."""

    feature_dim = TINY_FEATURE_DIM
    SIDE = 16

    def __init__(self, convention: str, seed: int, device: torch.device | str = "cpu") -> None:
        self.convention = convention
        self.identity = f"{TINY_PREFIX}:{seed} ({convention} quantisation, a random projection; NOT the FID Inception)"
        self.device = torch.device(device)
        g = torch.Generator().manual_seed(seed)
        d = 3 * self.SIDE ** 2
        self.projection = (torch.randn(d, self.feature_dim, generator=g) * (3.0 / d) ** 0.5).to(self.device)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        if self.convention == PAPER:
            pixels = (paper_input(images) * 255).byte()
        else:
            pixels = to_uint8(_checked(images))
        x = _rgb(pixels.to(self.device).float() / 127.5 - 1.0)
        x = torch.nn.functional.interpolate(x, size=(self.SIDE, self.SIDE), mode="bilinear", align_corners=False)
        return torch.tanh(x.flatten(1) @ self.projection)


def official_resize() -> dict:
    """``FrechetInceptionDistance`` keywords for the resize of torchmetrics 1.6 (torch-fidelity's TF1-compatible
    bilinear), which the official code ran: ``antialias=False`` where the argument exists."""
    import inspect

    from torchmetrics.image.fid import FrechetInceptionDistance

    return {"antialias": False} if "antialias" in inspect.signature(FrechetInceptionDistance).parameters else {}


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


# ---------------------------------------------------------------- weights
def resolve_weights_path(cli: str | None = None, config: str | None = None, convention: str = DEFAULT_CONVENTION) \
        -> str:
    """``--inception`` > ``eval.inception_weights`` > ``$TARFLOW_INCEPTION_WEIGHTS`` > torch hub's cache."""
    for value in (cli, config, os.environ.get(WEIGHTS_ENV)):
        if value:
            return value
    cached = Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS[check_convention(convention)].name
    if cached.is_file():
        return str(cached)
    raise InceptionWeightsError(missing_weights_message(f"no --inception path, no {WEIGHTS_ENV}, nothing in "
                                                        f"{cached.parent}", convention))


def weights_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 (16 hex digits) of a network's tensors by name, BatchNorm counters left out: the same for the weights
    file and for the copy an official statistics file embeds."""
    digest = hashlib.sha256()
    for name in sorted(state):
        if not name.endswith("num_batches_tracked"):
            digest.update(name.encode())
            digest.update(state[name].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _file_identity(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return f"{path.stem} sha256:{digest.hexdigest()[:16]}"


def load_fid_network(path: str, convention: str = DEFAULT_CONVENTION,
                     device: torch.device | str = "cpu") -> FIDNetwork:
    """The convention's network with the weights at ``path`` (a file, or a directory holding the convention's file
    name), or ``tiny-random[:SEED]``."""
    check_convention(convention)
    if path.startswith(TINY_PREFIX):
        seed = path[len(TINY_PREFIX):].lstrip(":")
        if seed and not seed.isdigit():
            raise InceptionWeightsError(f"--inception {path!r}: expected {TINY_PREFIX} or {TINY_PREFIX}:SEED")
        return TinyRandomNetwork(convention, int(seed or 0), device)
    file = Path(path).expanduser()
    if file.is_dir():
        file = file / WEIGHTS[convention].name
    if not file.is_file():
        raise InceptionWeightsError(missing_weights_message(f"{file} does not exist", convention))
    identity = _file_identity(file)
    if convention == PAPER:
        return PaperNetwork(str(file), identity, device)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InceptionWeightsError(f"{file} is not readable as a PyTorch state dict ({type(e).__name__}: "
                                    f"{_first_line(e)})") from None
    if not isinstance(state, Mapping):
        raise InceptionWeightsError(f"{file} does not hold a state dict")
    return PytorchFidNetwork(state, identity, device)
