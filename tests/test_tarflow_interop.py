"""Loading checkpoints of the official code and exporting ones it loads with strict=True."""

import pytest
import torch

from models import TarFlow, TarFlowConfig


def test_export_has_exactly_the_reference_keys_shapes_order_and_masks(golden):
    model = TarFlow.from_reference(golden["state_dict"], TarFlowConfig(**golden["config"]))
    exported = model.reference_state_dict()
    assert list(exported) == list(golden["state_dict"])
    for key, ref in golden["state_dict"].items():
        assert exported[key].dtype == ref.dtype, key
        assert torch.equal(exported[key], ref), key


def test_own_state_dict_keeps_no_attention_mask(golden):
    model = TarFlow(TarFlowConfig(**golden["config"]))
    assert not [k for k in model.state_dict() if "attn_mask" in k]


def test_round_trip_through_a_file_with_weights_only_loading(golden, tmp_path):
    cfg = TarFlowConfig(**golden["uncond_config"])
    path = tmp_path / "ref.pth"
    torch.save(golden["uncond_state_dict"], path)
    model = TarFlow.from_reference(path, cfg)
    torch.save(model.reference_state_dict(), tmp_path / "export.pth")
    again = TarFlow.from_reference(str(tmp_path / "export.pth"), cfg)
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


def test_ddp_prefixed_checkpoints_load(golden):
    prefixed = {f"module.{k}": v for k, v in golden["state_dict"].items()}
    model = TarFlow.from_reference(prefixed, TarFlowConfig(**golden["config"]))
    assert torch.equal(model.blocks[1].pos_embed, golden["state_dict"]["blocks.1.pos_embed"])


def test_mismatching_config_names_the_first_bad_key_and_shapes(golden):
    wrong = TarFlowConfig(**{**golden["config"], "channels": 128})
    with pytest.raises(ValueError, match=r"'blocks.0.pos_embed' has shape \(16, 64\) but the model expects "
                                         r"\(16, 128\)"):
        TarFlow.from_reference(golden["state_dict"], wrong)


def test_conditional_checkpoint_into_unconditional_config_is_rejected(golden):
    with pytest.raises(ValueError, match=r"unexpected key 'blocks.0.class_embed'"):
        TarFlow.from_reference(golden["state_dict"], TarFlowConfig(**golden["uncond_config"]))
    with pytest.raises(ValueError, match=r"missing key 'blocks.0.class_embed'"):
        TarFlow.from_reference(golden["uncond_state_dict"], TarFlowConfig(**golden["config"]))


def test_mask_of_another_size_is_rejected(golden):
    sd = dict(golden["state_dict"])
    sd["blocks.0.attn_mask"] = torch.ones(16, 16)
    with pytest.raises(ValueError, match="blocks.0.attn_mask: expected the causal"):
        TarFlow.from_reference(sd, TarFlowConfig(**golden["config"]))


def test_truncated_file_is_a_clear_error(golden, tmp_path):
    path = tmp_path / "ref.pth"
    torch.save(golden["state_dict"], path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(Exception):
        TarFlow.from_reference(path, TarFlowConfig(**golden["config"]))
