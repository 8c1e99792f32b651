import pytest

from models import TarFlowConfig


def test_derived_sizes():
    c = TarFlowConfig(in_channels=3, img_size=32, patch_size=4, channels=128)
    assert (c.num_patches, c.patch_dim, c.num_heads) == (64, 48, 2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(img_size=30, patch_size=4), "img_size=30 is not divisible by patch_size=4"),
    (dict(channels=100), "channels=100 is not a multiple of head_dim=64"),
    (dict(num_blocks=0), "num_blocks must be a positive integer"),
    (dict(num_classes=-1), "num_classes must be an integer >= 0"),
    (dict(img_size=4, patch_size=4), "at least 2 patches"),
])
def test_impossible_configs_name_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TarFlowConfig(**kwargs)
