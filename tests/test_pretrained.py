"""models.pretrained: save_pretrained → from_pretrained is exact, never unpickles, and every broken file is named."""

import hashlib
import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from models import PretrainedError, TarFlow, TarFlowConfig, read_pretrained_metadata
from models.pretrained import CONFIG_FILE, WEIGHTS_FILE, is_pretrained_directory, read_pretrained_config

TINY = TarFlowConfig(in_channels=1, img_size=8, patch_size=2, channels=32, head_dim=16, num_blocks=2,
                     layers_per_block=1, num_classes=3)
METADATA = {"weights": "ema", "step": 1000, "config_hash": "0123456789abcdef"}


def perturbed(config: TarFlowConfig = TINY, seed: int = 0) -> TarFlow:
    """A tiny TarFlow whose blocks do something: a fresh one's proj_out is zero, so sampling would be the identity."""
    torch.manual_seed(seed)
    model = TarFlow(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        model.var.mul_(1.0 + 0.1 * torch.rand_like(model.var))  # the prior variance is saved too
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return perturbed()


@pytest.fixture
def exported(model, tmp_path):
    return model.save_pretrained(tmp_path / "export", metadata=METADATA)


def samples(model: TarFlow, **kwargs) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    c = model.config
    noise = torch.randn(6, c.num_patches, c.patch_dim, generator=g)
    labels = torch.tensor([0, 1, 2, -1, 0, 2])
    return model.reverse(noise, labels, **kwargs)


def rewrite_weights(directory, change) -> None:
    """Apply ``change`` to the exported state dict and write it back as a valid safetensors file, with its digest
    in config.json (a self-consistent export of other weights)."""
    state = load_file(directory / WEIGHTS_FILE)
    change(state)
    save_file(state, str(directory / WEIGHTS_FILE))
    digest = hashlib.sha256((directory / WEIGHTS_FILE).read_bytes()).hexdigest()
    rewrite_config(directory, lambda d: d.__setitem__("weights_sha256", digest))


def rewrite_config(directory, change) -> None:
    document = json.loads((directory / CONFIG_FILE).read_text())
    change(document)
    (directory / CONFIG_FILE).write_text(json.dumps(document))


# ---------------------------------------------------------------- the round trip
def test_round_trip_gives_the_same_tensors_and_bitwise_identical_samples(model, exported):
    loaded = TarFlow.from_pretrained(exported)
    assert not loaded.training and loaded.config == model.config
    expected, got = model.state_dict(), loaded.state_dict()
    assert list(got) == list(expected)
    assert all(got[k].dtype == v.dtype == torch.float32 and torch.equal(got[k], v) for k, v in expected.items())
    assert torch.equal(samples(loaded), samples(model))
    assert torch.equal(samples(loaded, guidance=1.5), samples(model, guidance=1.5))


def test_the_directory_holds_two_files_no_pickle_and_the_metadata(model, exported, monkeypatch):
    assert sorted(p.name for p in exported.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    # safetensors: an 8-byte little-endian header length, then a JSON header (a pickle or zip would start otherwise)
    raw = (exported / WEIGHTS_FILE).read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    assert header["__metadata__"] == {"format": "pt"} and header["var"]["dtype"] == "F32"

    def no_unpickling(*args, **kwargs):
        raise AssertionError("from_pretrained must not unpickle")

    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr("pickle.load", no_unpickling)
    monkeypatch.setattr("pickle.loads", no_unpickling)
    TarFlow.from_pretrained(exported)
    document = json.loads((exported / CONFIG_FILE).read_text())
    assert document["model_type"] == "tarflow" and document["architectures"] == ["TarFlow"]
    assert document["format_version"] == 1 and document["channels"] == 32 and document["nvp"] is True
    assert read_pretrained_metadata(exported) == METADATA
    assert read_pretrained_config(exported) == model.config
    assert is_pretrained_directory(exported) and not is_pretrained_directory(exported.parent)


def test_an_export_replaces_an_earlier_one_and_needs_no_metadata(exported):
    other = perturbed(TarFlowConfig(in_channels=1, img_size=8, patch_size=4, channels=16, head_dim=16,
                                    num_blocks=1, layers_per_block=1), seed=1)
    assert other.save_pretrained(exported) == exported
    assert TarFlow.from_pretrained(exported).config == other.config
    assert read_pretrained_metadata(exported) == {}
    assert sorted(p.name for p in exported.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]  # no temp file left


def test_metadata_json_cannot_hold_writes_nothing(model, tmp_path):
    with pytest.raises(PretrainedError, match="metadata for config.json is not JSON"):
        model.save_pretrained(tmp_path / "export", metadata={"step": object()})
    assert not (tmp_path / "export").exists()


def test_exporting_onto_a_file_is_refused(model, tmp_path):
    (tmp_path / "model.pt").write_bytes(b"x")
    with pytest.raises(PretrainedError, match=r"model\.pt is a file; save_pretrained writes a directory"):
        model.save_pretrained(tmp_path / "model.pt")


# ---------------------------------------------------------------- a broken model.safetensors
DAMAGE = ["truncated", "header_bytes", "header_length", "empty", "tensor_byte"]


def damaged(raw: bytes, damage: str) -> bytes:
    tensor_byte = len(raw) - 10  # inside the last tensor's data: safetensors' header check cannot see it
    return {"truncated": raw[:-100], "header_bytes": raw[:8] + b"\xff\xfe\x00\x01" + raw[12:],
            "header_length": b"\xff" * 8 + raw[8:], "empty": b"",
            "tensor_byte": raw[:tensor_byte] + bytes([raw[tensor_byte] ^ 0x40]) + raw[tensor_byte + 1:]}[damage]


@pytest.mark.parametrize("damage,digest", [(d, True) for d in DAMAGE] + [(d, False) for d in DAMAGE
                                                                          if d != "tensor_byte"])
def test_a_corrupted_weights_file_names_the_file(exported, damage, digest):
    """With the digest save_pretrained records, any damage is caught by it; without one (a directory another tool
    wrote) safetensors' own header checks remain, which a flipped tensor byte would pass."""
    if not digest:
        rewrite_config(exported, lambda d: d.pop("weights_sha256"))
    path = exported / WEIGHTS_FILE
    path.write_bytes(damaged(path.read_bytes(), damage))
    with pytest.raises(PretrainedError) as e:
        TarFlow.from_pretrained(exported)
    expected = (f"{path}: its sha256 is not the weights_sha256 {CONFIG_FILE} records", "export the model again") \
        if digest else (f"{path} is not a readable safetensors file", "truncated or corrupted; export the model again")
    assert all(part in str(e.value) for part in expected), str(e.value)


def test_a_tensor_of_the_wrong_shape_names_the_key(exported):
    key = "blocks.1.class_embed"
    rewrite_weights(exported, lambda s: s.__setitem__(key, torch.zeros(4, *s[key].shape[1:])))
    with pytest.raises(PretrainedError) as e:
        TarFlow.from_pretrained(exported)
    message = str(e.value)
    assert f"{exported / WEIGHTS_FILE} key {key!r} has shape (4, 1, 32) but the model expects (3, 1, 32)" in message
    assert f"{WEIGHTS_FILE} and {CONFIG_FILE} of {exported} disagree" in message


def test_a_tensor_of_the_wrong_dtype_names_the_key(exported):
    rewrite_weights(exported, lambda s: s.__setitem__("var", s["var"].half()))
    with pytest.raises(PretrainedError, match=r"key 'var' has dtype torch.float16 but the model expects "
                                              r"torch.float32"):
        TarFlow.from_pretrained(exported)


def test_a_missing_key_is_named(exported):
    rewrite_weights(exported, lambda s: s.pop("blocks.0.proj_in.weight"))
    with pytest.raises(PretrainedError, match=rf"{WEIGHTS_FILE} is missing key 'blocks.0.proj_in.weight' "
                                              r"\(expected shape \(32, 4\)\)"):
        TarFlow.from_pretrained(exported)


def test_an_unexpected_key_is_named(exported):
    rewrite_weights(exported, lambda s: s.__setitem__("blocks.2.proj_in.weight", torch.zeros(32, 4)))
    with pytest.raises(PretrainedError, match=rf"{WEIGHTS_FILE} has unexpected key 'blocks.2.proj_in.weight' "
                                              r"\(shape \(32, 4\)\)"):
        TarFlow.from_pretrained(exported)


def test_a_missing_weights_file_is_named(exported):
    (exported / WEIGHTS_FILE).unlink()
    with pytest.raises(PretrainedError, match=rf"{exported / WEIGHTS_FILE} not found"):
        TarFlow.from_pretrained(exported)


# ---------------------------------------------------------------- a broken config.json
def test_an_unknown_config_key_names_config_json_and_the_key(exported):
    rewrite_config(exported, lambda d: d.update(num_heads=2))
    with pytest.raises(PretrainedError, match=rf"{exported / CONFIG_FILE}: unknown key 'num_heads'"):
        TarFlow.from_pretrained(exported)


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("channels"), r"missing key 'channels'"),
    (lambda d: d.update(nvp=1), r"'nvp' must be bool, got 1"),
    (lambda d: d.update(channels=40), r"TarFlowConfig.channels=40 is not a multiple of head_dim=16"),
    (lambda d: d.update(model_type="llama"), r"model_type is 'llama', expected 'tarflow'"),
    (lambda d: d.update(format_version=2), r"format_version 2 is newer than this code reads \(1\)"),
])
def test_a_bad_config_value_names_config_json(exported, change, message):
    rewrite_config(exported, change)
    with pytest.raises(PretrainedError, match=rf"{exported / CONFIG_FILE}: {message}"):
        TarFlow.from_pretrained(exported)


def test_metadata_that_is_not_an_object_names_config_json(exported):
    rewrite_config(exported, lambda d: d.update(tarflow=[1]))
    with pytest.raises(PretrainedError, match=rf"{exported / CONFIG_FILE}: 'tarflow' must be an object"):
        read_pretrained_metadata(exported)


def test_a_missing_or_unparsable_config_json_is_named(exported):
    (exported / CONFIG_FILE).write_text("{not json")
    with pytest.raises(PretrainedError, match=rf"{exported / CONFIG_FILE} is not valid JSON"):
        TarFlow.from_pretrained(exported)
    (exported / CONFIG_FILE).unlink()
    with pytest.raises(PretrainedError, match=rf"{exported / CONFIG_FILE} not found"):
        TarFlow.from_pretrained(exported)
