"""The ``tarflow`` command: train, sample, eval, and checkpoint conversion."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from cluster.launch_cli import add_launch_parser
from data_pipeline.storage import DataSourceError
from models import TarFlow
from scaling.cli import add_scale_parser

from .checkpoint import FORMAT_VERSION, CheckpointError, atomic_torch_save
from .config import ConfigError, config_hash, load_config, to_yaml
from .stores import StoreError


def _split_config_and_overrides(args: list[str]) -> tuple[str | None, list[str]]:
    """``tarflow train [CONFIG] [key=value ...]``: the first argument is a config file unless it is an override."""
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


def _load_model(uri: str, device: torch.device) -> tuple[TarFlow, "object"]:
    """A checkpoint (any strategy's), a checkpoint root (its newest) or a one-file export."""
    from .checkpoint.export import consolidated_model

    state, cfg, _ = consolidated_model(uri)
    model = TarFlow(cfg.model)
    model.load_state_dict(state)
    return model.to(device).eval(), cfg


def cmd_train(args: argparse.Namespace) -> int:
    from .loop import train

    config_path, overrides = _split_config_and_overrides(args.rest)
    cfg = load_config(config_path, overrides)
    result = train(cfg)
    if result.preempted:
        print(f"stopped at step {result.step} ({result.preempted}); checkpoint {result.checkpoint}; exit code "
              f"{cfg.preemption.exit_code} asks the scheduler to requeue", flush=True)
        return cfg.preemption.exit_code
    if result.sample_grids:  # the rank that wrote the outputs reports them
        start = "n/a" if result.initial_bits_per_dim is None else f"{result.initial_bits_per_dim:.4f}"
        print(f"done: step {result.step}, held-out bits/dim {start} → {result.final_bits_per_dim:.4f}; "
              f"checkpoint {result.checkpoint}; samples {result.sample_grids[0].parent}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from .noise import denoise_std
    from .runtime import resolve_device, resolve_precision
    from .sampling import fixed_noise_and_labels, generate, save_grids

    device = resolve_device(args.device)
    model, cfg = _load_model(args.checkpoint, device)
    noise, labels = fixed_noise_and_labels(model, args.num, args.seed)
    if args.labels is not None:
        if not model.config.num_classes:
            raise ValueError("--labels given but the model is unconditional")
        labels = torch.tensor([args.labels[i % len(args.labels)] for i in range(args.num)])
    if args.trajectory:
        from .trajectory import sampling_trajectory, save_trajectory

        trajectory, names = sampling_trajectory(
            model, noise, labels, guidance=args.guidance, attn_temp=args.attn_temp, annealed=args.annealed,
            denoise_std=denoise_std(cfg.train.noise, cfg.train.noise_std) if args.denoise else None,
            device=device, precision=resolve_precision(args.precision, device, "gaussian"))
        for p in save_trajectory(trajectory, names, Path(args.out), labels):
            print(p)
        bad = int((~torch.isfinite(trajectory[:, -1]).flatten(1).all(1)).sum())
        if bad:
            print(f"warning: {bad} samples with NaN/Inf values", file=sys.stderr)
        return 0
    result = generate(model, noise, labels, guidances=[args.guidance], attn_temp=args.attn_temp,
                      annealed=args.annealed,
                      denoise_std=denoise_std(cfg.train.noise, cfg.train.noise_std) if args.denoise else None,
                      device=device, precision=resolve_precision(args.precision, device, "gaussian"))
    paths = save_grids(result, Path(args.out), "", labels)
    for p in paths:
        print(p)
    bad = {k: v for k, v in result.nonfinite.items() if v}
    if bad:
        print(f"warning: samples with NaN/Inf values: {bad}", file=sys.stderr)
    return 0


_FID_ONLY = {"num_samples": 50000, "guidance": [0.0], "attn_temp": [1.0], "annealed": False, "denoise": False,
             "inception": None, "ref_stats": None, "seed": 0, "batch_size": 0, "precision": "auto",
             "max_redraws": 10, "save_samples": False, "no_bpd": False, "out": None, "split": "train"}


def cmd_eval(args: argparse.Namespace) -> int:
    from data_pipeline import build_loader

    from .evaluate import heldout_bits_per_dim
    from .runtime import resolve_device

    if args.checkpoint == "stats":  # `tarflow eval stats DATA_URI --out FILE [data.key=value ...]`
        if not args.overrides:
            raise ValueError("usage: tarflow eval stats DATA_URI --out FILE [data.key=value ...]")
        return cmd_eval_stats(args, args.overrides[0], args.overrides[1:])
    if args.metric == "fid":
        from .eval_suite import cli_eval_fid

        return cli_eval_fid(args)
    misplaced = [k for k, default in _FID_ONLY.items() if getattr(args, k) != default]
    if misplaced:
        where = "`eval stats`" if misplaced[0] == "split" else "--metric fid"
        raise ValueError(f"--{misplaced[0].replace('_', '-')} applies to {where} only (this is --metric bpd)")
    device = resolve_device(args.device)
    model, cfg = _load_model(args.checkpoint, device)
    not_data = [o for o in args.overrides if not o.startswith("data.")]
    if not_data:
        raise ConfigError(f"eval takes data.* overrides only, got {not_data[0]!r}")
    cfg = load_config(None, args.overrides, base=cfg)
    loader = build_loader(cfg.data, "heldout", cfg.eval.batch_size, seed=0)
    bpd, n = heldout_bits_per_dim(model, loader, device, max_images=args.max_images)
    print(json.dumps({"bits_per_dim": bpd, "images": n, "checkpoint": str(args.checkpoint)}))
    return 0


def cmd_eval_stats(args: argparse.Namespace, data_uri: str | None = None, overrides: list[str] | None = None) -> int:
    from .eval_suite import cli_eval_stats

    if data_uri is None:  # `tarflow eval-stats DATA_URI ...`
        data_uri, overrides = args.data_uri, args.overrides
    return cli_eval_stats(args, data_uri, list(overrides or []))


def cmd_import_reference(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    model = TarFlow.from_reference(args.file, cfg.model)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save({"format": FORMAT_VERSION, "step": 0, "model": model.state_dict(),
                       "config_yaml": to_yaml(cfg), "config_hash": config_hash(cfg)}, out)
    print(out)
    return 0


def cmd_export_reference(args: argparse.Namespace) -> int:
    model, _ = _load_model(args.checkpoint, torch.device("cpu"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(model.reference_state_dict(), out)
    print(out)
    return 0


def cmd_ckpt_ls(args: argparse.Namespace) -> int:
    from .checkpoint.export import listing

    rows = listing(args.uri)
    if not rows:
        print(f"no checkpoints under {args.uri}")
    for r in rows:
        if r["complete"]:
            print(f"step {r['step']:>9}  complete    {r['strategy']:<9} {r['world_size']:>3} ranks  {r['files']:>4} files "
                  f"{r['bytes'] / 2**20:>10.1f} MiB  config {r['config_hash']}")
        else:
            print(f"step {r['step']:>9}  INCOMPLETE  (no manifest: an interrupted save or deletion; never resumed)")
    return 0


def cmd_ckpt_verify(args: argparse.Namespace) -> int:
    from .checkpoint.export import verify

    bad = 0
    for step, problem in verify(args.uri):
        print(f"step {step}: {'ok' if problem is None else 'FAILED: ' + problem}")
        bad += problem is not None
    return 1 if bad else 0


def cmd_ckpt_export(args: argparse.Namespace) -> int:
    from .checkpoint.export import consolidated_model

    state, cfg, step = consolidated_model(args.uri)
    TarFlow(cfg.model).load_state_dict(state)  # it must load into the model its config describes
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save({"format": FORMAT_VERSION, "step": step, "model": state, "config_yaml": to_yaml(cfg),
                       "config_hash": config_hash(cfg)}, out)
    print(out)
    return 0


def parse_size(text: str) -> int:
    """``4000``, ``64MB``, ``1MiB`` → bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    number = text.strip().upper().rstrip("S")
    digits = len(number) - len(number.lstrip("0123456789."))
    value, unit = number[:digits], number[digits:].strip()
    if not value or unit not in units:
        raise argparse.ArgumentTypeError(f"cannot read size {text!r}; e.g. 4000, 64MB, 1MiB")
    return int(float(value) * units[unit])


def cmd_data_write(args: argparse.Namespace) -> int:
    from data_pipeline.sources import open_source
    from data_pipeline.writer import write_dataset

    source = open_source(args.source, image_size=args.image_size, heldout_fraction=args.heldout_fraction,
                         seed=args.split_seed)
    manifests = write_dataset(source, args.out, args.format, shard_size=args.shard_size, encoding=args.encoding)
    for split, m in manifests.items():
        print(f"{args.out.rstrip('/')}/{split}: {m.num_samples} samples in {len(m.shards)} {m.format} shards, "
              f"images {tuple(m.image_shape)} {m.encoding}, {m.num_classes} classes")
    return 0


def _add_fid_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-samples", type=int, default=50000, help="samples per setting, over all ranks (a "
                                                                  "multiple of the number of ranks)")
    p.add_argument("--guidance", type=float, nargs="+", default=[0.0], help="guidance weights (several: a sweep)")
    p.add_argument("--attn-temp", type=float, nargs="+", default=[1.0],
                   help="attention temperatures of the guidance branch (several: a sweep)")
    p.add_argument("--annealed", action="store_true", help="ramp the guidance weight over each block's steps")
    p.add_argument("--denoise", action="store_true", help="one score-based denoising step after sampling")
    p.add_argument("--inception", default=None, help="FID Inception weights, pt_inception-2015-12-05-6726825d.pth "
                                                     "(default: $TARFLOW_INCEPTION_WEIGHTS, torch hub's cache)")
    p.add_argument("--ref-stats", default=None, help="reference statistics from `tarflow eval stats`")
    p.add_argument("--seed", type=int, default=0, help="base seed of the noise (sample i: seed, i, attempt)")
    p.add_argument("--batch-size", type=int, default=0,
                   help="samples per batch and rank (default: eval.batch_size); stats: images per loader batch")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="sampling autocast (auto: bf16 on CUDA, as the reference's evaluation)")
    p.add_argument("--max-redraws", type=int, default=10, help="fresh-noise redraws of a NaN/Inf sample")
    p.add_argument("--save-samples", action="store_true", help="every rank writes its uint8 samples into --out")
    p.add_argument("--no-bpd", action="store_true", help="skip the held-out and sample bits/dim")
    p.add_argument("--out", default=None, help="fid: a directory for sweep.csv, sweep.png, results.json, "
                                               "previews; stats: the statistics file (.npz)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tarflow", description="Train and use TarFlow normalizing flows.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train (no CONFIG: the embedded digits default)",
                       description="tarflow train [CONFIG.yaml] [section.key=value ...]")
    p.add_argument("rest", nargs="*", metavar="[CONFIG] [key=value ...]")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="sample a checkpoint into a PNG grid and an .npz")
    p.add_argument("checkpoint")
    p.add_argument("--num", type=int, default=64)
    p.add_argument("--guidance", type=float, default=0.0)
    p.add_argument("--attn-temp", type=float, default=1.0)
    p.add_argument("--annealed", action="store_true", help="ramp the guidance weight over each block's steps")
    p.add_argument("--denoise", action="store_true", help="add the grid after one score-based denoising step")
    p.add_argument("--labels", type=int, nargs="+", help="class labels, cycled (default: 0, 1, 2, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32", choices=["auto", "fp32", "bf16"])
    p.add_argument("--trajectory", action="store_true",
                   help="write trajectory.png/.npz instead: the image after each inverted flow block (rows: "
                        "samples, columns: noise, then each block; with --denoise a last denoised column)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser(
        "eval", help="held-out bits/dim of a checkpoint; FID and sweeps (--metric fid); "
                     "`eval stats DATA_URI --out FILE`: FID reference statistics",
        description="tarflow eval CKPT [data.key=value ...] [--metric fid --num-samples N --ref-stats FILE "
                    "--inception PATH --guidance W [W ...] --attn-temp T [T ...] --annealed --denoise --out DIR] | "
                    "tarflow eval stats DATA_URI --out FILE [data.key=value ...] [--split train|heldout "
                    "--inception PATH]. Put data.* overrides before options that take several values. Several "
                    "processes: torchrun --nproc_per_node=K -m trainer.cli eval ... (samples and images are "
                    "sharded over the ranks).")
    p.add_argument("checkpoint", help="a checkpoint URI; or the word `stats` followed by DATA_URI")
    p.add_argument("overrides", nargs="*", metavar="data.key=value")
    p.add_argument("--max-images", type=int, default=0, help="cap on held-out images (bits/dim) or data images "
                                                             "(stats); 0: all")
    p.add_argument("--device", default="auto")
    p.add_argument("--metric", default="bpd", choices=["bpd", "fid"])
    _add_fid_arguments(p)
    p.add_argument("--split", default="train", choices=["train", "heldout"],
                   help="stats: the data split (train: the usual FID reference)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("eval-stats", help="FID reference statistics of a data set (= `eval stats`)",
                       description="tarflow eval-stats DATA_URI --out FILE [data.key=value ...]; DATA_URI: digits, "
                                   "photos, or a directory / s3://bucket/prefix written by `tarflow data write`")
    p.add_argument("data_uri")
    p.add_argument("overrides", nargs="*", metavar="data.key=value")
    p.add_argument("--out", required=True, help="the statistics file (.npz)")
    p.add_argument("--split", default="train", choices=["train", "heldout"])
    p.add_argument("--inception", default=None, help="FID Inception weights (pt_inception-2015-12-05-6726825d.pth)")
    p.add_argument("--batch-size", type=int, default=0, help="images per loader batch and rank (default 100)")
    p.add_argument("--max-images", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_eval_stats)

    p = sub.add_parser("data", help="write datasets as shards")
    dsub = p.add_subparsers(dest="data_command", required=True)
    q = dsub.add_parser("write", help="write a source as webdataset or MDS shards with a manifest per split")
    q.add_argument("--source", required=True, help="digits | photos | imagefolder:PATH | npz:PATH")
    q.add_argument("--format", required=True, choices=["webdataset", "mds"])
    q.add_argument("--out", required=True, help="a directory or s3://bucket/prefix")
    q.add_argument("--image-size", type=int, default=0, help="resize the shorter side and centre-crop to this")
    q.add_argument("--shard-size", type=parse_size, default=64 * 2**20, help="bytes per shard, e.g. 64MB")
    q.add_argument("--encoding", default="png", choices=["png", "jpeg", "raw"])
    q.add_argument("--heldout-fraction", type=float, default=0.1)
    q.add_argument("--split-seed", type=int, default=0)
    q.set_defaults(func=cmd_data_write)

    p = sub.add_parser("ckpt", help="list, verify and export checkpoints; convert from and to the official code")
    csub = p.add_subparsers(dest="ckpt_command", required=True)
    q = csub.add_parser("ls", help="the checkpoints under a root (directory or s3://bucket/prefix)")
    q.add_argument("uri")
    q.set_defaults(func=cmd_ckpt_ls)
    q = csub.add_parser("verify", help="check every file of a checkpoint (or of all under a root) against its "
                                       "manifest: presence, size, sha256")
    q.add_argument("uri")
    q.set_defaults(func=cmd_ckpt_verify)
    q = csub.add_parser("export", help="any strategy's checkpoint → one consolidated model file")
    q.add_argument("uri", help="…/step-NNNNNNNN, or a root (its newest checkpoint)")
    q.add_argument("--out", required=True)
    q.set_defaults(func=cmd_ckpt_export)
    q = csub.add_parser("import-reference", help="official .pth → tarflow checkpoint")
    q.add_argument("file")
    q.add_argument("--config", help="YAML config whose model section matches the file")
    q.add_argument("--out", required=True)
    q.add_argument("overrides", nargs="*", metavar="key=value")
    q.set_defaults(func=cmd_import_reference)
    q = csub.add_parser("export-reference", help="tarflow checkpoint or export → .pth the official code loads "
                                                 "strictly")
    q.add_argument("checkpoint")
    q.add_argument("--out", required=True)
    q.set_defaults(func=cmd_export_reference)
    add_launch_parser(sub)
    add_scale_parser(sub)
    return parser


def _without_local_rank(argv: list[str]) -> list[str]:
    """The deepspeed launcher (and torch.distributed.launch) append ``--local_rank=N``; LOCAL_RANK in the environment
    says the same, and cluster.env reads that."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--local_rank", "--local-rank"):
            skip = True
        elif not arg.startswith(("--local_rank=", "--local-rank=")):
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(_without_local_rank(sys.argv[1:] if argv is None else argv))
    try:
        return args.func(args)
    except (ConfigError, CheckpointError, ValueError, DataSourceError, StoreError, ImportError) as e:
        print(f"tarflow {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
