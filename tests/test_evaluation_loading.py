"""Checkpoint → model: the weights, eval mode, and a mismatch that names its key."""

import pytest
import torch

from tarflow_testing.evaluation import CPU, export, perturbed_model
from trainer.checkpoint import CheckpointError
from trainer.evaluation.loading import load_model


def test_an_export_loads_into_the_model_its_config_describes(tmp_path):
    model, cfg = perturbed_model()
    loaded, loaded_cfg, weights = load_model(str(export(model, cfg, tmp_path / "model.pt")), CPU)
    assert not loaded.training and loaded_cfg.model == cfg.model and weights == "raw"
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


def test_weights_that_do_not_match_the_config_name_the_key(tmp_path):
    other, _ = perturbed_model(["model.channels=64"])
    _, cfg = perturbed_model()
    with pytest.raises((CheckpointError, ValueError), match=r"has shape \(16, 64\) but the model expects \(16, 32\)"):
        load_model(str(export(other, cfg, tmp_path / "mismatch.pt")), CPU)
