"""``tarflow eval CKPT`` (held-out bits/dim; ``--metric fid``: FID and sweeps) and ``tarflow eval stats DATA_URI``
(FID reference statistics)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

_FID_ONLY = {"num_samples": 50000, "guidance": [0.0], "attn_temp": [1.0], "annealed": False, "denoise": False,
             "inception": None, "ref_stats": None, "seed": 0, "batch_size": 0, "precision": "auto",
             "max_redraws": 10, "save_samples": False, "no_bpd": False, "out": None, "split": "train"}


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


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval", help="held-out bits/dim of a checkpoint; FID and sweeps (--metric fid); "
                     "`eval stats DATA_URI --out FILE`: FID reference statistics",
        description="tarflow eval CKPT [data.key=value ...] [--metric fid --num-samples N --ref-stats FILE "
                    "--inception PATH --guidance W [W ...] --attn-temp T [T ...] --annealed --denoise --out DIR] | "
                    "tarflow eval stats DATA_URI --out FILE [data.key=value ...] [--split train|heldout "
                    "--inception PATH]; DATA_URI: digits, photos, or a directory / s3://bucket/prefix written by "
                    "`tarflow data write`. Put data.* overrides before options that take several values. Several "
                    "processes: torchrun --nproc_per_node=K -m tarflow eval ... (samples and images are "
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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.checkpoint == "stats":  # `tarflow eval stats DATA_URI --out FILE [data.key=value ...]`
        if not args.overrides:
            raise ValueError("usage: tarflow eval stats DATA_URI --out FILE [data.key=value ...]")
        return run_stats(args, args.overrides[0], args.overrides[1:])
    if args.metric == "fid":
        return run_fid(args)
    misplaced = [k for k, default in _FID_ONLY.items() if getattr(args, k) != default]
    if misplaced:
        where = "`eval stats`" if misplaced[0] == "split" else "--metric fid"
        raise ValueError(f"--{misplaced[0].replace('_', '-')} applies to {where} only (this is --metric bpd)")
    from cluster.env import discover
    from trainer.distributed import process_group

    env = discover()
    model, cfg, device = _load(args, env)
    with process_group(env, device):
        bpd, n = _heldout_bits_per_dim(model, cfg, args, env, device)
        if env.is_main:
            print(json.dumps({"bits_per_dim": bpd, "images": n, "checkpoint": str(args.checkpoint)}))
    return 0


def _check_overrides(args: argparse.Namespace) -> None:
    from trainer.config import ConfigError

    not_data = [o for o in args.overrides if not o.startswith("data.")]
    if not_data:
        raise ConfigError(f"eval takes data.* overrides only, got {not_data[0]!r}")


def _load(args: argparse.Namespace, env):
    """(model, its config with the data.* overrides, device)."""
    from trainer.config import load_config
    from trainer.evaluation.loading import load_model
    from trainer.runtime import resolve_device

    _check_overrides(args)
    device = resolve_device(args.device, env.local_rank)
    model, cfg = load_model(args.checkpoint, device)
    return model, load_config(None, args.overrides, base=cfg), device


def _heldout_bits_per_dim(model, cfg, args: argparse.Namespace, env, device) -> tuple[float, int]:
    """Collective: the held-out bits/dim over every rank's share (as the training loop's evaluation)."""
    from trainer.evaluation.bpd import collective_bits_per_dim, heldout_loader

    loader = heldout_loader(cfg.data, cfg.eval.batch_size, env.rank, env.world_size)
    return collective_bits_per_dim(model, loader, device, max_images=args.max_images, world_size=env.world_size)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_fid(args: argparse.Namespace) -> int:
    """``tarflow eval CKPT --metric fid ...``: FID of one setting, or a sweep (``trainer.evaluation.sweep``). With
    ``--out DIR`` rank 0 also writes ``results.json``: the rows and the provenance of the reference and the network."""
    from cluster.env import discover
    from trainer.distributed import process_group
    from trainer.evaluation.fid import FIDError, check_comparable, load_stats
    from trainer.evaluation.inception import load_fid_inception, resolve_weights_path
    from trainer.evaluation.sampler import check_num_samples
    from trainer.evaluation.sweep import run_sweep, settings_notes, sweep_settings
    from trainer.noise import denoise_std
    from trainer.runtime import resolve_precision

    env = discover()
    per_rank = check_num_samples(args.num_samples, env.world_size)
    if not args.ref_stats:
        raise FIDError("--metric fid needs --ref-stats FILE: make it with `tarflow eval stats DATA_URI --out FILE` "
                       "(the same --inception as here)")
    if args.split != "train":
        raise ValueError("--split applies to `tarflow eval stats` only")
    if args.max_redraws < 0:
        raise ValueError(f"--max-redraws must be >= 0, got {args.max_redraws}")
    _check_overrides(args)
    reference = load_stats(args.ref_stats)
    model, cfg, device = _load(args, env)
    weights = resolve_weights_path(args.inception, cfg.eval.inception_weights or None)
    inception = load_fid_inception(weights, device)
    c = model.config
    notes = check_comparable(reference, network=inception.identity, feature_dim=inception.feature_dim,
                             image_shape=(c.in_channels, c.img_size, c.img_size),
                             where=f"--ref-stats {args.ref_stats}")
    sigma = denoise_std(cfg.train.noise, cfg.train.noise_std) if args.denoise else None
    settings = sweep_settings(args.guidance, args.attn_temp, annealed=args.annealed, denoise_std=sigma)
    notes += settings_notes(settings, c.conditional)
    out_dir = Path(args.out) if args.out else None
    if out_dir is None and (len(settings) > 1 or args.save_samples):
        raise ValueError("a sweep (several --guidance / --attn-temp values) and --save-samples write files: "
                         "give --out DIR")
    precision = resolve_precision(args.precision, device, "gaussian")
    batch_size = min(args.batch_size or cfg.eval.batch_size, per_rank)
    with process_group(env, device):
        if env.is_main:
            for note in notes:
                _stderr(f"note: {note}")
            if inception.identity.startswith("tiny-random"):
                _stderr("WARNING: --inception tiny-random is a random stand-in for plumbing tests; these are not "
                        "FIDs")
        heldout = None if args.no_bpd else _heldout_bits_per_dim(model, cfg, args, env, device)[0]
        if out_dir is not None and env.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
        title = f"{args.checkpoint} ({args.num_samples} samples)"
        results = run_sweep(model, inception, reference, settings, out_dir=out_dir, title=title,
                            save_samples=args.save_samples, log=_stderr, rank=env.rank,
                            world_size=env.world_size, num_samples=args.num_samples, base_seed=args.seed,
                            batch_size=batch_size, device=device, precision=precision,
                            max_redraws=args.max_redraws, sample_bpd=not args.no_bpd, heldout_bpd=heldout)
        if not env.is_main:
            return 0
        report = {"checkpoint": str(args.checkpoint), "metric": "fid", "num_samples": args.num_samples,
                  "ranks": env.world_size, "seed": args.seed, "inception": inception.identity,
                  "reference": {"file": str(args.ref_stats), "n": reference.n, **reference.meta},
                  "precision": precision.name, "results": [r.row() for r in results], "notes": notes}
        if len(results) == 1:
            report["fid"] = results[0].fid
        if out_dir is not None:
            (out_dir / "results.json").write_text(json.dumps(report, indent=2) + "\n")
            report["out"] = str(out_dir)
        print(json.dumps(report))
    return 0


def run_stats(args: argparse.Namespace, data_uri: str, overrides: list[str]) -> int:
    """``tarflow eval stats DATA_URI --out FILE [data.key=value ...]`` (``trainer.evaluation.reference``)."""
    from cluster.env import discover
    from trainer.distributed import process_group
    from trainer.evaluation.fid import save_stats
    from trainer.evaluation.inception import load_fid_inception, resolve_weights_path
    from trainer.evaluation.reference import compute_reference_stats, data_config_for
    from trainer.runtime import resolve_device

    if not args.out:
        raise ValueError("eval stats needs --out FILE (an .npz)")
    env = discover()
    data_cfg = data_config_for(data_uri, overrides)
    device = resolve_device(args.device, env.local_rank)
    inception = load_fid_inception(resolve_weights_path(args.inception), device)
    with process_group(env, device):
        stats = compute_reference_stats(data_cfg, args.split, inception, batch_size=args.batch_size or 100,
                                        device=device, rank=env.rank, world_size=env.world_size,
                                        max_images=args.max_images)
        if env.is_main:
            path = save_stats(stats, args.out)
            print(json.dumps({"out": str(path), "n": stats.n, "feature_dim": int(stats.mu.shape[0]),
                              **{k: stats.meta[k] for k in ("split", "image_shape", "network")}}))
    return 0
