"""The weight average (trainer/ema.py) against its definition, and in the training loop: applied steps only."""

import pytest
import torch

from cluster.env import discover
from models import TarFlow
from tarflow_testing.runs import TINY
from trainer.config import ConfigError, EMAConfig, load_config
from trainer.distributed import process_group
from trainer.ema import WeightAverage, eval_weights
from trainer.loop import Trainer


def weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g)}


def test_the_average_copies_until_start_step_then_averages_with_the_decay():
    trajectory = [weights(k) for k in range(6)]
    average = WeightAverage(EMAConfig(decay=0.75, start_step=2), trajectory[0])
    expected = {k: v.double() for k, v in trajectory[0].items()}
    for step in range(1, 6):
        average.update(trajectory[step], step)
        d = 0.0 if step <= 2 else 0.75
        expected = {k: d * expected[k] + (1 - d) * trajectory[step][k].double() for k in expected}
        for k in expected:
            torch.testing.assert_close(average.averages[k].double(), expected[k], rtol=0, atol=1e-6)
    assert average.updates == 3  # steps 3, 4 and 5
    assert all(a.dtype == torch.float32 for a in average.averages.values())


def test_warmup_follows_the_tensorflow_schedule():
    average = WeightAverage(EMAConfig(decay=0.9, warmup=True), weights(0))
    seen = []
    for step in range(1, 101):
        seen.append(average.decay(step))
        average.update(weights(step), step)
    assert seen[0] == pytest.approx(2 / 11) and seen[9] == pytest.approx(11 / 20)  # (1 + n) / (10 + n)
    assert seen[-1] == 0.9 and max(seen) == 0.9  # capped by the decay once (1 + n) / (10 + n) passes it (n >= 80)
    assert seen.index(0.9) == 79  # the 80th update (n = 80): 81 / 90


def test_bf16_sources_are_averaged_in_fp32():
    source = {"w": torch.full((4,), 1.0, dtype=torch.bfloat16)}
    average = WeightAverage(EMAConfig(decay=0.999), source)
    for step in range(1, 4):
        average.update({"w": torch.full((4,), 2.0, dtype=torch.bfloat16)}, step)
    # 1 + (1 - 0.999^3): far below bf16's resolution near 1 (2^-7), kept by the fp32 average
    assert average.averages["w"].dtype == torch.float32
    assert average.averages["w"][0].item() == pytest.approx(1 + (1 - 0.999 ** 3), rel=1e-6)


def test_loading_checks_every_name_and_shape_and_restores_the_count():
    average = WeightAverage(EMAConfig(decay=0.5), weights(0))
    average.update(weights(1), 1)
    state = {"updates": average.updates, "averages": {k: v.clone() for k, v in average.averages.items()}}
    other = WeightAverage(EMAConfig(decay=0.5), weights(2))
    other.load_state_dict(state, shown_as="f.pt")
    assert other.updates == 1 and all(torch.equal(other.averages[k], average.averages[k]) for k in state["averages"])
    with pytest.raises(KeyError, match=r"f.pt: the weight average has no entry 'b'"):
        other.load_state_dict({"updates": 1, "averages": {"a": state["averages"]["a"]}}, shown_as="f.pt")
    with pytest.raises(ValueError, match=r"f.pt: weight average 'a' has shape \(4, 3\), this run's \(3, 4\)"):
        other.load_state_dict({"updates": 1, "averages": {**state["averages"], "a": torch.zeros(4, 3)}},
                              shown_as="f.pt")
    other.reset(weights(3))
    assert other.updates == 0 and torch.equal(other.averages["a"], weights(3)["a"])


def test_which_weights_a_run_evaluates():
    assert eval_weights(load_config(None, ["train.ema.decay=0.99"])) == "ema"
    assert eval_weights(load_config(None, ["train.ema.decay=0.99", "eval.weights=raw"])) == "raw"
    assert eval_weights(load_config(None, [])) == "raw"  # no average: the trained weights, whatever eval.weights


@pytest.mark.parametrize("override,message", [
    ("train.ema.decay=1.0", "train.ema.decay: must be in [0, 1)"),
    ("train.ema.start_step=-1", "train.ema.start_step: must be >= 0"),
    ("eval.weights=best", "eval.weights: must be one of ('ema', 'raw')"),
    ("train.ema.decy=0.9", "did you mean 'train.ema.decay'"),
])
def test_bad_settings_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_config(None, [override])


def test_a_skipped_step_leaves_the_average_as_it_was(tmp_path, monkeypatch):
    cfg = load_config(None, [*TINY, f"train.run_dir={tmp_path}", "train.steps=4", "train.ema.decay=0.5",
                             "eval.at_start=false"])
    env, device = discover(), torch.device("cpu")
    with process_group(env, device):
        trainer = Trainer(cfg, env, device)
        batches = iter(trainer.train_loader)
        ema, params = trainer.strategy.ema, dict(trainer.model.named_parameters())
        trainer.train_step(batches)  # step 1: applied
        before = {k: v.clone() for k, v in ema.averages.items()}
        original = TarFlow.loss
        monkeypatch.setattr(TarFlow, "loss", staticmethod(lambda z, logdets: original(z, logdets) * float("nan")))
        trainer.train_step(batches)  # step 2: NaN loss, skipped
        assert trainer.state.nonfinite_total == 1 and ema.updates == 1
        assert all(torch.equal(ema.averages[k], before[k]) for k in before)
        monkeypatch.setattr(TarFlow, "loss", staticmethod(original))
        trainer.train_step(batches)  # step 3: applied again, averaged with decay 0.5
        assert ema.updates == 2
        for k in before:
            torch.testing.assert_close(ema.averages[k], 0.5 * before[k] + 0.5 * params[k].detach(), rtol=0, atol=1e-7)
