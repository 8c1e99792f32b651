"""A small classifier of an embedded data set: the network behind the offline sample-quality metrics (``quality``).

FID needs the FID Inception weights, which this code cannot download; this classifier needs nothing but the data.
It is trained once (``tarflow eval classifier train digits [data.key=value ...]``) on the **train** split the
trainer uses (the same ``data.heldout_fraction`` / ``data.split_seed``), never on held-out images, and cached in one
file (``default_path``: under ``$TARFLOW_CACHE``, else ``~/.cache/tarflow/``, named by the data set, its split and
the recipe), which ``tarflow eval --metric quality`` finds by itself.

Network (``ClassifierNet``): images in model space ([-1, 1]) → 3×3 conv (width) → ReLU → 3×3 conv stride 2
(2·width) → ReLU → 3×3 conv stride 2 (2·width) → ReLU → global average pool → linear (``feature_dim``) → ReLU: the
*features* (the penultimate layer) → linear → class logits. Any image size and channel count.

Training (``train_classifier``): on the CPU (the same file on any machine), Adam with a cosine learning rate,
random translations of up to ``shift`` pixels (zero padding) as augmentation; every random draw (initialisation,
shuffling, shifts) comes from ``recipe.seed``, so training is deterministic for a given thread count.

The file (``torch.save``, read with ``weights_only=True``) holds the weights, ``meta`` (the data set and split, image
shape, classes, recipe, image counts, accuracies, training time) and the held-out split's images' features,
labels and predicted labels: the metrics' reference, so evaluating needs no data. Using it on images of another
shape or another number of classes is an error naming both.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

RECIPE_VERSION = 1
CACHE_ENV = "TARFLOW_CACHE"
SUPPORTED = ("digits", "photos")


class ClassifierError(ValueError):
    """A classifier file that is missing, unreadable or made for other images; the message says what to do."""


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    epochs: int = 30
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    width: int = 32
    feature_dim: int = 32
    shift: int = 1  # random translation (pixels) of the training images


class ClassifierNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width: int = 32, feature_dim: int = 32) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def to_model_space(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 k → k/255·2 − 1, what the loaders yield and the classifier reads."""
    return images_uint8.float() / 255.0 * 2.0 - 1.0


# ---------------------------------------------------------------- the data
def dataset_key(data_cfg) -> dict:
    """What the classifier depends on: the embedded set and its split (an error for other formats)."""
    if data_cfg.format != "embedded" or data_cfg.source not in SUPPORTED:
        what = data_cfg.source if data_cfg.format == "embedded" else f"{data_cfg.format} data at {data_cfg.uri}"
        raise ClassifierError(f"the classifier metrics support the embedded sets {list(SUPPORTED)}, not {what}")
    return {"format": "embedded", "source": data_cfg.source, "heldout_fraction": float(data_cfg.heldout_fraction),
            "split_seed": int(data_cfg.split_seed)}


def split_arrays(data_cfg) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images, train labels, held-out images, held-out labels): uint8 / int64, the trainer's split."""
    from data_pipeline import load_embedded, split_heldout

    dataset_key(data_cfg)
    data = load_embedded(data_cfg.source)
    train_idx, heldout_idx = split_heldout(len(data.images), data_cfg.heldout_fraction, data_cfg.split_seed)
    images, labels = torch.from_numpy(np.array(data.images)), torch.from_numpy(np.array(data.labels))
    return images[train_idx], labels[train_idx], images[heldout_idx], labels[heldout_idx]


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "tarflow")


def default_path(data_cfg, recipe: Recipe = Recipe()) -> Path:
    """The cache file of the classifier of ``data_cfg``'s data set and split, trained with ``recipe``."""
    key = dataset_key(data_cfg)
    digest = hashlib.sha1(json.dumps([RECIPE_VERSION, key, asdict(recipe)], sort_keys=True).encode()).hexdigest()
    return cache_dir() / f"classifier-{key['source']}-{digest[:10]}.pt"


# ---------------------------------------------------------------- training
def _shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Each image translated by its own (dy, dx) in [-max_shift, max_shift]², zero-padded."""
    if max_shift <= 0:
        return x
    b, c, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)  # -1: black in model space
    offsets = torch.randint(0, 2 * max_shift + 1, (b, 2), generator=generator)
    rows = (offsets[:, :1] + torch.arange(h))[:, None, :, None]
    cols = (offsets[:, 1:] + torch.arange(w))[:, None, None, :]
    return padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]


@torch.no_grad()
def predict(net: ClassifierNet, images_uint8: torch.Tensor, batch_size: int = 500,
            device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, D) float32, predicted labels (N,) int64) on the CPU."""
    was_training = net.training
    net.eval()
    feats, preds = [], []
    try:
        for start in range(0, len(images_uint8), batch_size):
            x = to_model_space(images_uint8[start:start + batch_size].to(device))
            f = net.features(x)
            feats.append(f.float().cpu())
            preds.append(net.head(f).argmax(1).cpu())
    finally:
        net.train(was_training)
    if not feats:
        return torch.empty(0, net.head.in_features), torch.empty(0, dtype=torch.int64)
    return torch.cat(feats), torch.cat(preds)


def train_classifier(data_cfg, recipe: Recipe = Recipe(), log=None) -> "Classifier":
    """Train on ``data_cfg``'s train split (CPU, deterministic); the held-out split gives the reference."""
    key = dataset_key(data_cfg)
    from data_pipeline import load_embedded

    x_train, y_train, x_held, y_held = split_arrays(data_cfg)
    num_classes = load_embedded(data_cfg.source).num_classes
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(recipe.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        net = ClassifierNet(x_train.shape[1], num_classes, recipe.width, recipe.feature_dim)
    opt = torch.optim.Adam(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps_per_epoch = -(-len(x_train) // recipe.batch_size)
    total = recipe.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    data = to_model_space(x_train)
    net.train()
    for epoch in range(recipe.epochs):
        order = torch.randperm(len(data), generator=generator)
        for start_i in range(0, len(order), recipe.batch_size):
            idx = order[start_i:start_i + recipe.batch_size]
            loss = F.cross_entropy(net(_shift(data[idx], recipe.shift, generator)), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if log is not None and (epoch + 1) % 10 == 0:
            log(f"classifier epoch {epoch + 1}/{recipe.epochs}: loss {loss.item():.4f}")
    seconds = time.perf_counter() - start
    net.eval()
    _, train_pred = predict(net, x_train)
    held_feats, held_pred = predict(net, x_held)
    meta = {"version": RECIPE_VERSION, "dataset": key, "image_shape": list(x_train.shape[1:]),
            "num_classes": num_classes, "recipe": asdict(recipe), "train_images": len(x_train),
            "heldout_images": len(x_held), "train_accuracy": float((train_pred == y_train).double().mean()),
            "heldout_accuracy": float((held_pred == y_held).double().mean()), "train_seconds": round(seconds, 3),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return Classifier(net, meta, held_feats, y_held, held_pred)


# ---------------------------------------------------------------- the file
@dataclass
class Classifier:
    net: ClassifierNet
    meta: dict
    heldout_features: torch.Tensor   # (M, D) float32: the reference of the metrics
    heldout_labels: torch.Tensor     # (M,) int64
    heldout_predictions: torch.Tensor
    path: str = ""

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.meta["image_shape"])

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    def describe(self) -> str:
        d = self.meta["dataset"]
        return (f"{d['source']} ({'×'.join(map(str, self.image_shape))}, {self.num_classes} classes, "
                f"held-out fraction {d['heldout_fraction']:g}, split seed {d['split_seed']})")

    def check_images(self, image_shape, num_classes: int, where: str = "the checkpoint") -> None:
        """An error naming both unless images of ``image_shape`` (C, H, W) with ``num_classes`` labels (0: an
        unconditional model, any) are what the classifier was trained on."""
        shape_ok = tuple(image_shape) == self.image_shape
        classes_ok = not num_classes or num_classes == self.num_classes
        if not (shape_ok and classes_ok):
            got = f"{'×'.join(map(str, image_shape))} images" + (f" of {num_classes} classes" if num_classes else "")
            raise ClassifierError(f"the classifier {self.path or ''} was trained on {self.describe()}, but "
                                  f"{where} has {got}: train one on that data with `tarflow eval classifier "
                                  f"train DATA_URI` (or give --classifier FILE)")

    def to(self, device) -> "Classifier":
        self.net.to(device)
        return self


def save_classifier(clf: Classifier, path: str | Path) -> Path:
    """Written atomically (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    state = {k: v.cpu() for k, v in clf.net.state_dict().items()}
    torch.save({"state_dict": state, "meta": json.dumps(clf.meta, sort_keys=True),
                "heldout_features": clf.heldout_features, "heldout_labels": clf.heldout_labels,
                "heldout_predictions": clf.heldout_predictions}, tmp)
    tmp.replace(path)
    return path


def load_classifier(path: str | Path, device: torch.device | str = "cpu") -> Classifier:
    path = Path(path)
    if not path.is_file():
        raise ClassifierError(f"no classifier at {path}; train it once with `tarflow eval classifier train "
                              f"DATA_URI [data.key=value ...]` (the data set and split of the checkpoint)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        meta = json.loads(blob["meta"])
        r = meta["recipe"]
        net = ClassifierNet(meta["image_shape"][0], meta["num_classes"], r["width"], r["feature_dim"])
        net.load_state_dict(blob["state_dict"])
    except Exception as e:
        raise ClassifierError(f"{path} is not a classifier file from `tarflow eval classifier train` "
                              f"({type(e).__name__}: {e})") from None
    net.eval().to(device)
    return Classifier(net, meta, blob["heldout_features"], blob["heldout_labels"], blob["heldout_predictions"],
                      str(path))


def train_command(data_cfg) -> str:
    d = dataset_key(data_cfg)
    return (f"tarflow eval classifier train {d['source']} data.heldout_fraction={d['heldout_fraction']:g} "
            f"data.split_seed={d['split_seed']}")


def find_classifier(data_cfg, path: str | Path | None = None, device: torch.device | str = "cpu", *,
                    image_shape=None, num_classes: int = 0) -> Classifier:
    """``path``, else the cache file of ``data_cfg``'s data set and split (a missing one: an error with the command
    that trains it); checked against images of ``image_shape`` and ``num_classes`` when given."""
    if path is None:
        path = default_path(data_cfg)
        if not path.is_file():
            raise ClassifierError(f"no classifier for this data set and split in the cache ({path}); train it "
                                  f"once with `{train_command(data_cfg)}` (a few seconds on a CPU)")
    clf = load_classifier(path, device)
    if image_shape is not None:
        clf.check_images(image_shape, num_classes)
    return clf
