import io
import random

import torch

from trainer.run_state import RunState, capture_rng, restore_rng


def test_rng_states_survive_a_weights_only_round_trip():
    device = torch.device("cpu")
    random.seed(1)
    torch.manual_seed(1)
    buffer = io.BytesIO()
    torch.save({"rng": capture_rng(device)}, buffer)
    expected = (random.random(), torch.rand(3))
    random.seed(99)
    torch.manual_seed(99)
    buffer.seek(0)
    restore_rng(torch.load(buffer, weights_only=True)["rng"], device)
    got = (random.random(), torch.rand(3))
    assert got[0] == expected[0] and torch.equal(got[1], expected[1])


def test_run_state_round_trips():
    state = RunState(step=7, images_seen=70, loader={"epoch": 1}, metric_window={"steps": 2})
    assert RunState.from_dict(state.to_dict()) == state
