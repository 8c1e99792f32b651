"""What a checkpoint of the official code fixes and implies: every config key its tensors' shapes determine is
checked on import, and the values the official Model fixes without saving are checked both ways."""

import dataclasses

import pytest
import torch

from models import TarFlowConfig
from models.reference_config import (
    OFFICIAL_FIXED,
    ReferenceMismatchError,
    check_exportable,
    check_importable,
    load_reference_file,
)


def test_the_fixed_values_are_those_of_the_official_model():
    # transformer_flow.Model builds every MetaBlock with head_dim=64 and expansion=4 (TARFLOW.md §3).
    assert OFFICIAL_FIXED == {"head_dim": 64, "expansion": 4}


@pytest.mark.parametrize("change, message", [
    ({"channels": 128, "head_dim": 64}, "model.channels = 128 contradicts ref, whose blocks.0.proj_in.weight of "
                                        "shape (64, 48) implies 64; set model.channels=64"),
    ({"num_blocks": 2}, "model.num_blocks = 2 contradicts ref, whose last block, blocks.3, implies 4; set "
                        "model.num_blocks=4"),
    ({"layers_per_block": 3}, "model.layers_per_block = 3 contradicts ref, whose last layer, blocks.0.attn_blocks.1, "
                              "implies 2; set model.layers_per_block=2"),
    ({"num_classes": 3}, "model.num_classes = 3 contradicts ref, whose blocks.0.class_embed of shape (10, 1, 64) "
                         "implies 10; set model.num_classes=10"),
    ({"nvp": False}, "model.nvp = False contradicts ref, whose blocks.0.proj_out.weight of shape (96, 64) (tokens of "
                     "48 features) implies True; set model.nvp=true"),
    ({"in_channels": 1}, "model.in_channels × model.patch_size² = 1 × 4² = 16 contradicts ref, whose "
                         "blocks.0.proj_in.weight of shape (64, 48) implies 48; set model.in_channels and "
                         "model.patch_size to give 48 features per token"),
    ({"img_size": 32}, "(model.img_size / model.patch_size)² = (32 / 4)² = 64 contradicts ref, whose "
                       "blocks.0.pos_embed of shape (16, 64) implies 16; set model.img_size and model.patch_size to "
                       "give 16 tokens"),
    ({"expansion": 2}, "model.expansion=2 contradicts ref: the official Model that wrote it computes with expansion=4 "
                       "(fixed, not saved); set model.expansion=4"),
])
def test_import_names_the_config_key_the_file_contradicts(golden, change, message):
    config = dataclasses.replace(TarFlowConfig(**golden["config"]), **change)
    with pytest.raises(ReferenceMismatchError) as raised:
        check_importable(config, golden["state_dict"], "ref")
    assert str(raised.value) == message


def test_the_golden_config_is_importable_and_exportable(golden):
    for name in ("config", "uncond_config", "vp_config"):
        config = TarFlowConfig(**golden[name])
        check_importable(config, golden[name.replace("config", "state_dict")], "ref")
        check_exportable(config)


def test_export_refuses_each_value_the_official_model_fixes():
    with pytest.raises(ReferenceMismatchError, match=r"^model.expansion=2 cannot be exported: the official Model "
                                                     r"fixes expansion=4 without saving it"):
        check_exportable(TarFlowConfig(channels=128, expansion=2))
    with pytest.raises(ReferenceMismatchError, match=r"^model.head_dim=32 cannot be exported"):
        check_exportable(TarFlowConfig(channels=128, head_dim=32))


def test_a_file_that_is_not_an_official_state_dict(tmp_path):
    ours = tmp_path / "export.pt"
    torch.save({"format": torch.tensor(1), "model": torch.zeros(1)}, ours)
    with pytest.raises(ReferenceMismatchError) as raised:
        check_importable(TarFlowConfig(), load_reference_file(ours), str(ours))
    assert str(raised.value) == (f"{ours} is not a state dict of the official Model: it has no key "
                                 f"'blocks.0.proj_in.weight' (its first keys: ['format', 'model'])")
    listed = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(ReferenceMismatchError, match=rf"^{listed} holds a list, not a state dict of tensors"):
        load_reference_file(listed)
    with pytest.raises(ReferenceMismatchError, match=rf"^{tmp_path / 'absent.pth'}: no such file$"):
        load_reference_file(tmp_path / "absent.pth")
