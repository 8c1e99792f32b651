"""What a checkpoint of the official code (``transformer_flow.Model``) fixes, implies and can be: the checks that keep
a conversion from computing a different model than the one its file describes.

The official ``Model`` hard-codes ``head_dim=64`` and ``expansion=4`` and saves neither. The attention head width
changes no parameter shape, so a file exported from a model with another head width loads there with
``strict=True`` and silently computes something else; both directions therefore compare the config with these
values (and, on import, with every size the tensors' shapes imply) before any tensor is copied."""

from __future__ import annotations

import os
import pickle
import re
from typing import Mapping

import torch

from .config import TarFlowConfig

# The keyword arguments transformer_flow.Model passes to every MetaBlock without exposing or saving them.
OFFICIAL_FIXED = {"head_dim": 64, "expansion": 4}


class ReferenceMismatchError(ValueError):
    """A config or file that a conversion to or from the official code would silently get wrong."""


def check_exportable(config: TarFlowConfig) -> None:
    """Raise unless the official code, loading this model's weights, computes this model."""
    for key, official in OFFICIAL_FIXED.items():
        value = getattr(config, key)
        if value != official:
            raise ReferenceMismatchError(
                f"model.{key}={value} cannot be exported: the official Model fixes {key}={official} without saving "
                f"it, so it would load this file with strict=True and compute a different model; export a model "
                f"trained with model.{key}={official}")


def check_importable(config: TarFlowConfig, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise unless ``config`` describes the model the official code computes from ``state_dict``: the values it
    fixes, then every size the tensors' shapes imply, each named by its config key."""
    for key, official in OFFICIAL_FIXED.items():
        value = getattr(config, key)
        if value != official:
            raise ReferenceMismatchError(
                f"model.{key}={value} contradicts {source}: the official Model that wrote it computes with "
                f"{key}={official} (fixed, not saved); set model.{key}={official}")
    for key, configured, implied, evidence, fix in _implied_sizes(config, state_dict, source):
        if configured != implied:
            raise ReferenceMismatchError(f"{key} = {configured} contradicts {source}, whose {evidence} implies "
                                         f"{implied}; {fix}")


def _implied_sizes(c: TarFlowConfig, state_dict: Mapping[str, torch.Tensor], source: str):
    """(config key, the config's value, the value the official state dict's shapes imply, which tensor says so,
    the fix) for every size those shapes determine. Patch size and channels are seen only through their product, the
    token width, and image and patch size only through the token count."""
    def shape(key: str) -> tuple[int, ...]:
        if key not in state_dict:
            raise ReferenceMismatchError(f"{source} is not a state dict of the official Model: it has no key {key!r} "
                                         f"(its first keys: {list(state_dict)[:3]})")
        return tuple(state_dict[key].shape)

    proj_in, pos_embed, proj_out = shape("blocks.0.proj_in.weight"), shape("blocks.0.pos_embed"), \
        shape("blocks.0.proj_out.weight")
    blocks = max(int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))) + 1
    layers = max((int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.0\.attn_blocks\.(\d+)\.", k))),
                 default=-1) + 1
    has_classes = "blocks.0.class_embed" in state_dict
    classes = shape("blocks.0.class_embed")[0] if has_classes else 0
    nvp = proj_out[0] == 2 * proj_in[1]
    rows = [
        ("model.channels", c.channels, proj_in[0], f"blocks.0.proj_in.weight of shape {proj_in}"),
        ("model.num_blocks", c.num_blocks, blocks, f"last block, blocks.{blocks - 1},"),
        ("model.layers_per_block", c.layers_per_block, layers, f"last layer, blocks.0.attn_blocks.{layers - 1},"),
        ("model.num_classes", c.num_classes, classes,
         f"blocks.0.class_embed of shape {shape('blocks.0.class_embed')}" if has_classes
         else "missing blocks.0.class_embed"),
        ("model.nvp", c.nvp, nvp, f"blocks.0.proj_out.weight of shape {proj_out} (tokens of {proj_in[1]} features)"),
    ]
    return [(key, got, implied, evidence, f"set {key}={str(implied).lower() if key == 'model.nvp' else implied}")
            for key, got, implied, evidence in rows] + [
        (f"model.in_channels × model.patch_size² = {c.in_channels} × {c.patch_size}²", c.patch_dim, proj_in[1],
         f"blocks.0.proj_in.weight of shape {proj_in}", f"set model.in_channels and model.patch_size to give "
                                                        f"{proj_in[1]} features per token"),
        (f"(model.img_size / model.patch_size)² = ({c.img_size} / {c.patch_size})²", c.num_patches, pos_embed[0],
         f"blocks.0.pos_embed of shape {pos_embed}", f"set model.img_size and model.patch_size to give "
                                                     f"{pos_embed[0]} tokens"),
    ]


def load_reference_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict in an official ``.pth``, read with ``weights_only=True`` (a file is code otherwise); a file
    that is missing, unreadable or holds more than tensors raises one line naming the file and why."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ReferenceMismatchError(
            f"{path}: torch.load(weights_only=True) refuses its pickle ({_refusal_reason(e)}); a checkpoint of the "
            f"official code is a plain state dict of tensors: re-save one with torch.save(model.state_dict(), "
            f"path)") from None
    except FileNotFoundError:
        raise ReferenceMismatchError(f"{path}: no such file") from None
    except (RuntimeError, EOFError, OSError) as e:  # a truncated or non-torch file: the zip reader's own words
        raise ReferenceMismatchError(f"{path} is not a readable torch file ({_first_sentence(str(e))})") from None
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ReferenceMismatchError(f"{path} holds a {type(loaded).__name__}, not a state dict of tensors "
                                     f"(the official code saves model.state_dict())")
    return dict(loaded)


def _refusal_reason(error: pickle.UnpicklingError) -> str:
    """The line of torch's multi-paragraph refusal that says what it met (``Unsupported global: ...``)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if "WeightsUnpickler error:" in line:
            return _first_sentence(line.split("WeightsUnpickler error:", 1)[1])
    return _first_sentence(lines[0]) if lines else type(error).__name__


def _first_sentence(text: str) -> str:
    """torch's errors go on to advice about other situations; the first sentence says what happened."""
    text = text.strip().splitlines()[0] if text.strip() else text
    return text.split(". ", 1)[0].rstrip(".")
