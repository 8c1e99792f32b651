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


def test_mismatching_config_names_the_config_key_and_the_tensor_that_contradicts_it(golden):
    wrong = TarFlowConfig(**{**golden["config"], "channels": 128})
    with pytest.raises(ValueError, match=r"^model.channels = 128 contradicts the reference state dict, whose "
                                         r"blocks.0.proj_in.weight of shape \(64, 48\) implies 64; set "
                                         r"model.channels=64$"):
        TarFlow.from_reference(golden["state_dict"], wrong)


def test_conditional_checkpoint_into_unconditional_config_is_rejected(golden):
    with pytest.raises(ValueError, match=r"^model.num_classes = 0 contradicts the reference state dict, whose "
                                         r"blocks.0.class_embed of shape \(10, 1, 64\) implies 10"):
        TarFlow.from_reference(golden["state_dict"], TarFlowConfig(**golden["uncond_config"]))
    with pytest.raises(ValueError, match=r"^model.num_classes = 10 contradicts the reference state dict, whose "
                                         r"missing blocks.0.class_embed implies 0; set model.num_classes=0$"):
        TarFlow.from_reference(golden["uncond_state_dict"], TarFlowConfig(**golden["config"]))


def test_a_shape_the_implied_sizes_do_not_cover_still_names_its_key(golden):
    sd = dict(golden["state_dict"])
    sd["blocks.2.attn_blocks.1.mlp.main.0.weight"] = torch.zeros(128, 64)  # an MLP of expansion 2 in one layer
    with pytest.raises(ValueError, match=r"'blocks.2.attn_blocks.1.mlp.main.0.weight' has shape \(128, 64\) but "
                                         r"the model expects \(256, 64\)"):
        TarFlow.from_reference(sd, TarFlowConfig(**golden["config"]))


def test_mask_of_another_size_is_rejected(golden):
    sd = dict(golden["state_dict"])
    sd["blocks.0.attn_mask"] = torch.ones(16, 16)
    with pytest.raises(ValueError, match="blocks.0.attn_mask: expected the causal"):
        TarFlow.from_reference(sd, TarFlowConfig(**golden["config"]))


def test_truncated_file_is_a_clear_error(golden, tmp_path):
    path = tmp_path / "ref.pth"
    torch.save(golden["state_dict"], path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match=rf"^{path} is not a readable torch file \(PytorchStreamReader failed "
                                         rf"reading zip archive: failed finding central directory\)$"):
        TarFlow.from_reference(path, TarFlowConfig(**golden["config"]))


class NotATensor:
    """A pickled object that ``torch.load(weights_only=True)`` refuses to rebuild."""


def test_a_file_whose_pickle_weights_only_loading_refuses_names_the_file_and_why(golden, tmp_path):
    path = tmp_path / "ref.pth"
    torch.save({**golden["state_dict"], "extra": NotATensor()}, path)
    with pytest.raises(ValueError) as raised:
        TarFlow.from_reference(path, TarFlowConfig(**golden["config"]))
    assert str(raised.value) == (
        f"{path}: torch.load(weights_only=True) refuses its pickle (Unsupported global: GLOBAL "
        f"{__name__}.NotATensor was not an allowed global by default); a checkpoint of the official code is a plain "
        f"state dict of tensors: re-save one with torch.save(model.state_dict(), path)")
    assert raised.value.__cause__ is None and raised.value.__suppress_context__  # one line, no chained traceback


def test_a_model_the_official_code_would_compute_differently_is_not_exported(golden):
    # head_dim changes no parameter shape: the official code would load this file with strict=True and compute a
    # model with 64-wide heads. The same state dict is refused, whatever its values.
    narrow = TarFlow(TarFlowConfig(**{**golden["config"], "head_dim": 32}))
    narrow.load_state_dict(TarFlow.from_reference(golden["state_dict"], TarFlowConfig(**golden["config"]))
                           .state_dict())
    with pytest.raises(ValueError, match=r"^model.head_dim=32 cannot be exported: the official Model fixes "
                                         r"head_dim=64 without saving it, so it would load this file with strict=True "
                                         r"and compute a different model; export a model trained with "
                                         r"model.head_dim=64$"):
        narrow.reference_state_dict()
    # ... and the two models do compute different things: the refusal is not about form.
    x = golden["x"]
    wide = TarFlow.from_reference(golden["state_dict"], TarFlowConfig(**golden["config"]))
    assert not torch.allclose(narrow(x, golden["y"])[0], wide(x, golden["y"])[0], atol=1e-3)


def test_an_official_file_into_a_head_dim_it_was_not_computed_with_is_refused(golden):
    with pytest.raises(ValueError, match=r"^model.head_dim=32 contradicts the reference state dict: the official "
                                         r"Model that wrote it computes with head_dim=64 \(fixed, not saved\); set "
                                         r"model.head_dim=64$"):
        TarFlow.from_reference(golden["state_dict"], TarFlowConfig(**{**golden["config"], "head_dim": 32}))
