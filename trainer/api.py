"""The trainer's small public API for the packages above it (the scaling driver): what they may know about a
training run without reaching into the trainer's modules or the model package.

- **config**: ``load_config`` (defaults ← YAML ← ``key=value`` overrides, validated; ``ConfigError`` names the key),
  and ``check_keys``, the same did-you-mean check of unknown keys against a dataclass schema that ``load_config``
  runs, for other YAML files with a schema of their own (a scaling study);
- **cost**: ``parameter_counts`` and ``train_flops_per_image`` of a model config (no model is built in memory);
- **FID setup**: ``load_fid_network`` resolves and loads the FID Inception network of a convention (``paper`` or
  ``pytorch-fid``) as ``tarflow eval`` does (``InceptionWeightsError`` says where to get the file),
  ``check_reference_stats`` checks a statistics file from ``tarflow eval stats`` against it (``stats_suffix``: the
  convention's file format); the FID itself is ``tarflow eval CKPT --metric fid`` (``cluster.torchrun``'s
  ``tarflow_command("eval")``); ``classifier_dataset`` checks that the offline quality metrics
  (``tarflow eval CKPT --metric quality``) support a config's data;
- **sampling**: ``SAMPLING_METHODS``, the block inversions ``tarflow eval --method`` accepts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from models import METHODS, TarFlow, num_parameters

from .config import Config, ConfigError, check_keys, load_config
from .evaluation.fid import check_comparable, load_stats, stats_suffix
from .evaluation.inception import CONVENTIONS, DEFAULT_CONVENTION, TINY_PREFIX, resolve_weights_path
from .evaluation.inception import load_fid_network as _load_network
from .flops import flops_per_image

__all__ = ["Config", "ConfigError", "load_config", "check_keys", "parameter_counts", "train_flops_per_image",
           "RANDOM_INCEPTION", "FID_CONVENTIONS", "DEFAULT_FID_CONVENTION", "stats_suffix", "FidNetwork",
           "load_fid_network", "check_reference_stats", "classifier_dataset", "SAMPLING_METHODS"]

# ``tiny-random[:SEED]`` in place of the FID Inception weights: a random stand-in network, plumbing only
RANDOM_INCEPTION = TINY_PREFIX
FID_CONVENTIONS, DEFAULT_FID_CONVENTION = CONVENTIONS, DEFAULT_CONVENTION
SAMPLING_METHODS = METHODS


# ---------------------------------------------------------------- cost
def parameter_counts(model_config) -> tuple[int, int]:
    """(total, without embeddings). "Embeddings" are each block's positional embedding (patches × channels) and
    class embedding (classes × channels): tables looked up by position or label, not matrices applied to the data.
    ``proj_in`` (patch → channels) and ``proj_out`` are ordinary weights and count. Built on the meta device: no
    memory, no initialisation."""
    import torch

    with torch.device("meta"):
        model = TarFlow(model_config)
    return num_parameters(model), num_parameters(model, exclude_embeddings=True)


def train_flops_per_image(model_config) -> int:
    """Analytic training FLOPs (forward + backward) of one image (``trainer.flops``)."""
    return flops_per_image(model_config).train


# ---------------------------------------------------------------- FID setup
@dataclass(frozen=True)
class FidNetwork:
    weights: str        # what ``tarflow eval --inception`` gets: an absolute path, or tiny-random[:SEED]
    identity: str       # the network's identity, as statistics files record it
    feature_dim: int
    convention: str = DEFAULT_CONVENTION  # paper | pytorch-fid (``tarflow eval --fid-convention``)

    @property
    def plumbing(self) -> bool:
        return self.identity.startswith(RANDOM_INCEPTION)


def load_fid_network(weights: str | None = None, convention: str = DEFAULT_CONVENTION) -> FidNetwork:
    """Resolve the FID Inception weights of ``convention`` as ``tarflow eval`` does (``weights``, else
    ``$TARFLOW_INCEPTION_WEIGHTS`` or torch hub's cache) and load them on the CPU; the eval suite's errors as they
    are."""
    path = resolve_weights_path(weights, None, convention)  # InceptionWeightsError: says where to get the file
    net = _load_network(path, convention, "cpu")
    resolved = path if path.startswith(RANDOM_INCEPTION) else str(Path(path).resolve())
    return FidNetwork(resolved, net.identity, net.feature_dim, net.convention)


def check_reference_stats(path: str | Path, network: FidNetwork, image_shape: tuple[int, int, int],
                          where: str = "reference statistics") -> None:
    """A reference statistics file must be readable and made with ``network`` for images of ``image_shape``
    (C, H, W); ``FIDError`` (a ValueError) says what is wrong and how to make the file."""
    check_comparable(load_stats(path), network=network.identity, feature_dim=network.feature_dim,
                     image_shape=image_shape, convention=network.convention, where=where)


# ---------------------------------------------------------------- classifier metrics setup
def classifier_dataset(data_config) -> dict:
    """The data set and split the quality metrics' classifier of ``data_config`` is trained on (the embedded sets
    only: ``ClassifierError``, a ValueError, otherwise); it is trained by ``tarflow eval classifier train``."""
    from .evaluation.classifier import dataset_key

    return dataset_key(data_config)
