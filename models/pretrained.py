"""A model as a Hugging Face-layout directory: ``model.safetensors`` (the state dict) and ``config.json``.

``config.json`` holds the ``TarFlowConfig`` fields at top level, ``model_type``, ``architectures``, a
``format_version``, the sha256 of the weights file (checked before loading), and the exporter's metadata under
``"tarflow"`` (which weights, which step). It is written last:
a directory is loadable only once its weights are complete. Loading never unpickles (safetensors holds raw tensors
and a JSON header), so an export from elsewhere can be opened safely.

    model = TarFlow.from_pretrained("exported/")      # eval mode, every key, shape and dtype checked
    read_pretrained_metadata("exported/")             # e.g. {"weights": "raw", "step": 1000, "config_hash": ...}
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, fields
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import TarFlowConfig
from .tarflow import TarFlow, check_state_dict_matches

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 1
MODEL_TYPE = "tarflow"
METADATA_KEY = "tarflow"
# config.json keys that are not TarFlowConfig fields.
_RESERVED_KEYS = ("model_type", "architectures", "format_version", "weights_sha256", METADATA_KEY)


class PretrainedError(ValueError):
    """A save_pretrained directory that cannot be written or read; the message names the file and what to do."""


# ---------------------------------------------------------------- writing
def save_pretrained(model: TarFlow, directory: str | os.PathLike, *, metadata: dict | None = None) -> Path:
    """Write ``model``'s state dict to ``directory/model.safetensors``, then ``config.json``; returns the directory."""
    directory = Path(directory)
    # Serialise first: metadata JSON cannot hold must fail before anything on disk changes.
    _config_json(model.config, metadata, "")
    # safetensors stores contiguous CPU tensors; the dtype stays as it is (the model's fp32).
    tensors = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    _make_directory(directory)
    # An earlier export's config.json would make the directory loadable while its weights are being replaced.
    (directory / CONFIG_FILE).unlink(missing_ok=True)
    # "format": "pt" is what transformers' safetensors loader expects in the header.
    _atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    # safetensors checks its header, not the tensor bytes: the digest catches a flipped byte anywhere
    config_text = _config_json(model.config, metadata, _sha256(directory / WEIGHTS_FILE))
    _atomic_write(directory / CONFIG_FILE, lambda tmp: tmp.write_text(config_text))
    return directory


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _config_json(config: TarFlowConfig, metadata: dict | None, weights_sha256: str) -> str:
    document = {**asdict(config), "model_type": MODEL_TYPE, "architectures": ["TarFlow"],
                "format_version": FORMAT_VERSION, "weights_sha256": weights_sha256,
                METADATA_KEY: dict(metadata or {})}
    try:
        return json.dumps(document, indent=2, sort_keys=False) + "\n"
    except (TypeError, ValueError) as e:
        raise PretrainedError(f"the metadata for {CONFIG_FILE} is not JSON ({e}): pass str, int, float, bool, "
                              f"None, lists and dicts of them") from None


def _make_directory(directory: Path) -> None:
    if directory.exists() and not directory.is_dir():
        raise PretrainedError(f"{directory} is a file; save_pretrained writes a directory: choose another path")
    directory.mkdir(parents=True, exist_ok=True)


def _atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """``write`` a temp file beside ``path``, make it durable, then rename it over ``path``: a reader sees the old
    file or the whole new one, never a partial one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync(path.parent)  # the rename itself


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- reading
def is_pretrained_directory(path: str | os.PathLike) -> bool:
    """Whether ``path`` looks like a save_pretrained directory (either file present: loading names a missing one)."""
    path = Path(path)
    return path.is_dir() and ((path / CONFIG_FILE).is_file() or (path / WEIGHTS_FILE).is_file())


def load_pretrained(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> TarFlow:
    """The model of a save_pretrained directory on ``map_location``, in eval mode; a file that is missing, corrupted
    or disagrees with config.json raises ``PretrainedError`` naming the file (and the key)."""
    directory = Path(directory)
    config = read_pretrained_config(directory)
    path = directory / WEIGHTS_FILE
    state = _load_weights(path, _read_config_document(directory / CONFIG_FILE).get("weights_sha256"))
    model = TarFlow(config)
    try:
        check_state_dict_matches(model, state, source=str(path), check_dtype=True)
    except ValueError as e:
        raise PretrainedError(f"{e}; {WEIGHTS_FILE} and {CONFIG_FILE} of {directory} disagree: export the model "
                              f"again with save_pretrained") from None
    model.load_state_dict(state, strict=True)
    return model.to(map_location).eval()


def _load_weights(path: Path, expected_sha256: str | None) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise PretrainedError(f"{path} not found: a save_pretrained directory holds {WEIGHTS_FILE} and "
                              f"{CONFIG_FILE}")
    # Directories written elsewhere (transformers-style tools) may carry no digest: their header is still checked.
    if expected_sha256 and _sha256(path) != expected_sha256:
        raise PretrainedError(f"{path}: its sha256 is not the weights_sha256 {CONFIG_FILE} records: the file is "
                              f"corrupted or was replaced; export the model again")
    try:
        return load_file(path, device="cpu")
    except SafetensorError as e:
        raise PretrainedError(f"{path} is not a readable safetensors file ({e}): it is truncated or corrupted; "
                              f"export the model again") from None


def read_pretrained_config(directory: str | os.PathLike) -> TarFlowConfig:
    """The ``TarFlowConfig`` of a save_pretrained directory's config.json, every field present and of its type."""
    path = Path(directory) / CONFIG_FILE
    document = _read_config_document(path)
    _check_format(path, document)
    names = {f.name for f in fields(TarFlowConfig)}
    unknown = [key for key in document if key not in names and key not in _RESERVED_KEYS]
    if unknown:
        raise PretrainedError(f"{path}: unknown key {unknown[0]!r} (a TarFlowConfig field or one of "
                              f"{', '.join(_RESERVED_KEYS)} expected): remove it or export the model again")
    values = {}
    for f in fields(TarFlowConfig):
        # A default would silently describe another architecture than the weights were trained with.
        if f.name not in document:
            raise PretrainedError(f"{path}: missing key {f.name!r} (TarFlowConfig.{f.name}): export the model again")
        value, expected = document[f.name], type(f.default)
        if type(value) is not expected:  # JSON's true is no int here, nor 1 a bool
            raise PretrainedError(f"{path}: {f.name!r} must be {expected.__name__}, got {value!r}")
        values[f.name] = value
    try:
        return TarFlowConfig(**values)
    except ValueError as e:
        raise PretrainedError(f"{path}: {e}") from None


def read_pretrained_metadata(directory: str | os.PathLike) -> dict:
    """The exporter's metadata (config.json's "tarflow" section), e.g. which weights ("ema" or "raw") and the step."""
    path = Path(directory) / CONFIG_FILE
    document = _read_config_document(path)
    _check_format(path, document)
    metadata = document.get(METADATA_KEY, {})
    if not isinstance(metadata, dict):
        raise PretrainedError(f"{path}: {METADATA_KEY!r} must be an object, got {metadata!r}")
    return metadata


def _read_config_document(path: Path) -> dict:
    if not path.is_file():
        raise PretrainedError(f"{path} not found: a save_pretrained directory holds {WEIGHTS_FILE} and "
                              f"{CONFIG_FILE} (written last: without it the export is incomplete)")
    try:
        document = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PretrainedError(f"{path} is not valid JSON ({e}): export the model again") from None
    if not isinstance(document, dict):
        raise PretrainedError(f"{path} must hold a JSON object, got {type(document).__name__}")
    return document


def _check_format(path: Path, document: dict) -> None:
    if document.get("model_type") != MODEL_TYPE:
        raise PretrainedError(f"{path}: model_type is {document.get('model_type')!r}, expected {MODEL_TYPE!r}: "
                              f"this directory holds another kind of model")
    version = document.get("format_version")
    if type(version) is not int or version < 1:
        raise PretrainedError(f"{path}: format_version must be a positive integer, got {version!r}: export the model "
                              f"again")
    if version > FORMAT_VERSION:
        raise PretrainedError(f"{path}: format_version {version} is newer than this code reads ({FORMAT_VERSION}): "
                              f"upgrade tarflow to load it")
