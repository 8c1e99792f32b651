"""trainer.api: the small public API the scaling driver uses instead of the trainer's modules."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from models import TarFlow, num_parameters
from trainer import api
from trainer.flops import flops_per_image


@dataclass
class Inner:
    steps: int = 1


@dataclass
class Outer:
    name: str = ""
    inner: Inner = field(default_factory=Inner)


def test_check_keys_is_the_trainers_did_you_mean_check():
    api.check_keys({"name": "x", "inner": {"steps": 2}}, Outer)
    with pytest.raises(api.ConfigError, match=r"unknown config key 'p.inner.stepz' \(from f.yaml\); did you mean "
                                              r"'p.inner.steps'\?"):
        api.check_keys({"inner": {"stepz": 2}}, Outer, prefix="p.", origin="f.yaml")
    with pytest.raises(api.ConfigError, match="'inner' is a section"):
        api.check_keys({"inner": 3}, Outer)
    with pytest.raises(api.ConfigError, match="unknown config key 'train.stepz'"):
        api.load_config(None, ["train.stepz=1"])


def test_cost_of_a_model_config():
    cfg = api.load_config(None, ["model.channels=32", "model.head_dim=16"])
    model = TarFlow(cfg.model)
    assert api.parameter_counts(cfg.model) == (num_parameters(model), num_parameters(model, exclude_embeddings=True))
    assert api.train_flops_per_image(cfg.model) == flops_per_image(cfg.model).train > 0


def test_the_fid_network_and_reference_check(tmp_path):
    net = api.load_fid_network(f"{api.RANDOM_INCEPTION}:0")
    assert net.plumbing and net.weights == f"{api.RANDOM_INCEPTION}:0" and net.feature_dim > 0
    with pytest.raises(ValueError):
        api.check_reference_stats(tmp_path / "missing.npz", net, (1, 8, 8))
