"""``tarflow ckpt ls|verify|export|import-reference|export-reference``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from trainer.config import Config


def add_parser(sub) -> None:
    p = sub.add_parser("ckpt", help="list, verify and export checkpoints; convert from and to the official code")
    csub = p.add_subparsers(dest="ckpt_command", required=True)
    q = csub.add_parser("ls", help="the checkpoints under a root (directory or s3://bucket/prefix)")
    q.add_argument("uri")
    q.set_defaults(func=ls)
    q = csub.add_parser("verify", help="check every file of a checkpoint (or of all under a root) against its "
                                       "manifest: presence, size, sha256")
    q.add_argument("uri")
    q.set_defaults(func=verify)
    q = csub.add_parser("export", help="any strategy's checkpoint → one consolidated model file, or a Hugging "
                                       "Face-layout directory (model.safetensors + config.json)")
    q.add_argument("uri", help="…/step-NNNNNNNN, or a root (its newest checkpoint)")
    q.add_argument("--out", required=True, help="the .pt file, or with --format safetensors the directory")
    q.add_argument("--format", choices=("pt", "safetensors"), default="pt",
                   help="pt: one torch file every command reads (default); safetensors: a directory "
                        "TarFlow.from_pretrained loads without unpickling")
    q.add_argument("--weights", default=None, choices=("ema", "raw"),
                   help="ema: the run's weight average (train.ema); raw: the trained weights (default: the average "
                        "when the checkpoint holds one); the export records which")
    q.set_defaults(func=export)
    q = csub.add_parser("import-reference", help="official .pth → tarflow checkpoint")
    q.add_argument("file")
    q.add_argument("--config", help="YAML config whose model section matches the file")
    q.add_argument("--out", required=True)
    q.add_argument("overrides", nargs="*", metavar="key=value")
    q.set_defaults(func=import_reference)
    q = csub.add_parser("export-reference", help="tarflow checkpoint or export → .pth the official code loads "
                                                 "strictly")
    q.add_argument("checkpoint")
    q.add_argument("--out", required=True)
    q.set_defaults(func=export_reference)


def ls(args: argparse.Namespace) -> int:
    from trainer.checkpoint.export import listing

    rows = listing(args.uri)
    if not rows:
        print(f"no checkpoints under {args.uri}")
    for r in rows:
        if r["complete"]:
            print(f"step {r['step']:>9}  complete    {r['strategy']:<9} {r['world_size']:>3} ranks  "
                  f"{r['files']:>4} files "
                  f"{r['bytes'] / 2**20:>10.1f} MiB  config {r['config_hash']}"
                  + ("  +ema" if r["weight_average"] else ""))
        else:
            print(f"step {r['step']:>9}  INCOMPLETE  (no manifest: an interrupted save or deletion; never resumed)")
    return 0


def verify(args: argparse.Namespace) -> int:
    from trainer.checkpoint.export import verify as verify_checkpoints

    bad = 0
    for step, problem in verify_checkpoints(args.uri):
        print(f"step {step}: {'ok' if problem is None else 'FAILED: ' + problem}")
        bad += problem is not None
    return 1 if bad else 0


def export(args: argparse.Namespace) -> int:
    from models import TarFlow
    from trainer.checkpoint.export import save_model_file
    from trainer.config import config_hash

    state, weights, cfg, step = _weights_to_export(args.uri, args.weights)
    model = TarFlow(cfg.model)
    model.load_state_dict(state)  # it must load into the model its config describes
    if args.format == "safetensors":
        metadata = {"weights": weights, "step": step, "config_hash": config_hash(cfg)}
        print(model.save_pretrained(Path(args.out), metadata=metadata))
    else:
        print(save_model_file(state, cfg, step, Path(args.out), weights=weights))
    return 0


def _weights_to_export(uri: str, weights: str | None) -> tuple[dict[str, torch.Tensor], str, Config, int]:
    """(state dict, which weights it is: "raw" or "ema", config, step) of the checkpoint an export writes: the
    average when the checkpoint holds one, unless ``weights`` says otherwise."""
    from trainer.checkpoint.export import consolidated_model

    state, cfg, step, used = consolidated_model(uri, weights)
    return state, used, cfg, step


def import_reference(args: argparse.Namespace) -> int:
    from models import TarFlow
    from trainer.checkpoint.export import save_model_file
    from trainer.config import load_config

    cfg = load_config(args.config, args.overrides)
    model = TarFlow.from_reference(args.file, cfg.model)
    print(save_model_file(model.state_dict(), cfg, 0, Path(args.out)))
    return 0


def export_reference(args: argparse.Namespace) -> int:
    from trainer.checkpoint import atomic_torch_save
    from trainer.evaluation.loading import load_model

    model = load_model(args.checkpoint, torch.device("cpu")).model  # the average when the checkpoint holds one
    state = model.reference_state_dict()  # refuses, before anything is written, what the official code gets wrong
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(state, out)
    print(out)
    return 0
