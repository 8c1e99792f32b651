import pytest

from cluster.env import ProcessEnv, discover


def test_no_variables_is_a_single_process():
    assert discover({}) == ProcessEnv()
    assert not discover({}).distributed


def test_torchrun_variables():
    env = discover({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
                    "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "TORCHELASTIC_RESTART_COUNT": "2"})
    assert env == ProcessEnv(rank=3, world_size=4, local_rank=1, local_world_size=2, node_rank=1,
                             master_addr="10.0.0.1", master_port=29500, restart_count=2, scheduler="torchrun")
    assert env.distributed and not env.is_main


@pytest.mark.parametrize("environ, message", [
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 is not below WORLD_SIZE=2"),
    ({"RANK": "0"}, "WORLD_SIZE is not set"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE=0 must be >= 1"),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "2"}, "LOCAL_RANK=3 is not below"),
])
def test_malformed_values_are_clear_errors(environ, message):
    with pytest.raises(ValueError, match=message):
        discover(environ)
