"""``tarflow eval CKPT`` (held-out bits/dim; ``--metric fid``: FID and sweeps; ``--metric quality``: the offline
classifier metrics, also in sweeps), ``tarflow eval stats DATA_URI`` (FID reference statistics) and ``tarflow eval
classifier train DATA_URI`` (the classifier of the quality metrics)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .inversion_args import DEFAULTS as INVERSION_DEFAULTS
from .inversion_args import add_inversion_arguments, inversion_from_args

_FID_ONLY = {"num_samples": 50000, "guidance": [0.0], "attn_temp": [1.0], "annealed": False, "denoise": "off",
             "inception": None, "ref_stats": None, "seed": 0, "batch_size": 0, "precision": "auto",
             "max_redraws": 10, "save_samples": False, "no_bpd": False, "out": None, "split": "train",
             "classifier": None, "fid_convention": "paper", **INVERSION_DEFAULTS}
METRICS = ("bpd", "fid", "quality", "fid+quality")


def _add_fid_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-samples", type=int, default=50000, help="samples per setting, over all ranks (a "
                                                                  "multiple of the number of ranks)")
    p.add_argument("--guidance", type=float, nargs="+", default=[0.0], help="guidance weights (several: a sweep)")
    p.add_argument("--attn-temp", type=float, nargs="+", default=[1.0],
                   help="attention temperatures of the guidance branch (several: a sweep)")
    p.add_argument("--annealed", action="store_true", help="ramp the guidance weight over each block's steps")
    add_inversion_arguments(p)
    p.add_argument("--denoise", nargs="?", const="on", default="off", choices=["on", "off", "both"],
                   help="one score-based denoising step after sampling (--denoise: on; both: every setting with and "
                        "without it, from the same draws)")
    p.add_argument("--fid-convention", default="paper", choices=["paper", "pytorch-fid"],
                   help="paper: torchmetrics/torch-fidelity fed as the official TarFlow code (truncation to uint8, "
                        "weights-inception-2015-12-05-6726825d.pth); pytorch-fid: the pytorch-fid package (rounding, "
                        "pt_inception-2015-12-05-6726825d.pth)")
    p.add_argument("--inception", default=None, help="the convention's FID Inception weights file, or a directory "
                                                     "holding it "
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
                                               "previews; stats: the statistics file (paper: .pth in the official "
                                               "format; pytorch-fid: .npz) or a directory (the official file name)")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval", help="held-out bits/dim of a checkpoint; FID and sweeps (--metric fid); offline quality metrics "
                     "(--metric quality); `eval stats DATA_URI --out FILE`: FID reference statistics; `eval "
                     "classifier train DATA_URI`: the quality metrics' classifier",
        description="tarflow eval CKPT [data.key=value ...] [--metric fid --num-samples N --ref-stats FILE "
                    "--inception PATH --guidance W [W ...] --attn-temp T [T ...] --annealed --denoise --out DIR] | "
                    "tarflow eval stats DATA_URI --out FILE|DIR [data.key=value ...] [--split train|heldout "
                    "--fid-convention paper|pytorch-fid --inception PATH] | tarflow eval classifier train "
                    "DATA_URI [data.key=value ...] [--seed S --out FILE]; DATA_URI: digits, photos, or a "
                    "directory / s3://bucket/prefix written by "
                    "`tarflow data write`. Put data.* overrides before options that take several values. Several "
                    "processes: torchrun --nproc_per_node=K -m tarflow eval ... (samples and images are "
                    "sharded over the ranks).")
    p.add_argument("checkpoint", help="a checkpoint URI; or the word `stats` followed by DATA_URI, or "
                                      "`classifier train DATA_URI`")
    p.add_argument("overrides", nargs="*", metavar="data.key=value")
    p.add_argument("--max-images", type=int, default=0, help="cap on held-out images (bits/dim) or data images "
                                                             "(stats); 0: all")
    p.add_argument("--device", default="auto")
    p.add_argument("--weights", default=None, choices=["ema", "raw"],
                   help="ema: the run's weight average (train.ema); raw: the trained weights (default: the average "
                        "when the checkpoint holds one); every record says which")
    p.add_argument("--metric", default="bpd", choices=METRICS,
                   help="quality: class accuracy, classifier-feature FD, precision/recall (offline; needs `tarflow "
                        "eval classifier train DATA_URI` once); fid+quality: both from the same samples")
    p.add_argument("--classifier", default=None, help="quality: the classifier file (default: the cache file of "
                                                      "the checkpoint's data set and split)")
    _add_fid_arguments(p)
    p.add_argument("--split", default="train", choices=["train", "heldout"],
                   help="stats: the data split (train: the usual FID reference)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.checkpoint == "stats":  # `tarflow eval stats DATA_URI --out FILE [data.key=value ...]`
        if not args.overrides:
            raise ValueError("usage: tarflow eval stats DATA_URI --out FILE [data.key=value ...]")
        return run_stats(args, args.overrides[0], args.overrides[1:])
    if args.checkpoint == "classifier":  # `tarflow eval classifier train DATA_URI [data.key=value ...]`
        return run_classifier_train(args)
    if args.metric != "bpd":
        return run_fid(args)
    misplaced = [k for k, default in _FID_ONLY.items() if getattr(args, k) != default]
    if misplaced:
        where = {"split": "`eval stats`", "classifier": "--metric quality"}.get(misplaced[0], "--metric fid")
        raise ValueError(f"--{misplaced[0].replace('_', '-')} applies to {where} only (this is --metric bpd)")
    from cluster.env import discover
    from trainer.distributed import process_group

    env = discover()
    model, cfg, device, weights = _load(args, env)
    with process_group(env, device):
        bpd, n = _heldout_bits_per_dim(model, cfg, args, env, device)
        if env.is_main:
            print(json.dumps({"bits_per_dim": bpd, "images": n, "checkpoint": str(args.checkpoint),
                              "weights": weights}))
    return 0


def _check_overrides(args: argparse.Namespace) -> None:
    from trainer.config import ConfigError

    not_data = [o for o in args.overrides if not o.startswith("data.")]
    if not_data:
        raise ConfigError(f"eval takes data.* overrides only, got {not_data[0]!r}")


def _load(args: argparse.Namespace, env):
    """(model, its config with the data.* overrides, device, which weights: ema | raw)."""
    from trainer.config import load_config
    from trainer.evaluation.loading import load_model
    from trainer.runtime import resolve_device

    _check_overrides(args)
    device = resolve_device(args.device, env.local_rank)
    model, cfg, weights = load_model(args.checkpoint, device, args.weights)
    return model, load_config(None, args.overrides, base=cfg), device, weights


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
    from trainer.evaluation.inception import load_fid_network, resolve_weights_path
    from trainer.evaluation.sampler import check_num_samples
    from trainer.evaluation.sweep import QUALITY_COLUMNS, run_sweep, settings_notes, sweep_settings
    from trainer.noise import denoise_std
    from trainer.runtime import resolve_precision

    env = discover()
    per_rank = check_num_samples(args.num_samples, env.world_size)
    with_fid = "fid" in args.metric
    if not with_fid and (args.ref_stats or args.inception):
        raise ValueError(f"--{'ref-stats' if args.ref_stats else 'inception'} applies to the FID: use --metric "
                         f"fid+quality for both")
    if with_fid and not args.ref_stats:
        raise FIDError("--metric fid needs --ref-stats FILE: make it with `tarflow eval stats DATA_URI --out FILE` "
                       "(the same --fid-convention and --inception as here)")
    if args.split != "train":
        raise ValueError("--split applies to `tarflow eval stats` only")
    if args.max_redraws < 0:
        raise ValueError(f"--max-redraws must be >= 0, got {args.max_redraws}")
    _check_overrides(args)
    reference = load_stats(args.ref_stats) if with_fid else None
    model, cfg, device, weights = _load(args, env)
    c = model.config
    inception, notes = None, []
    if with_fid:
        weights = resolve_weights_path(args.inception, cfg.eval.inception_weights or None, args.fid_convention)
        inception = load_fid_network(weights, args.fid_convention, device)
        notes = check_comparable(reference, network=inception.identity, feature_dim=inception.feature_dim,
                                 convention=inception.convention, weights_digest=inception.weights_digest,
                                 image_shape=(c.in_channels, c.img_size, c.img_size),
                                 where=f"--ref-stats {args.ref_stats}")
    classifier = _classifier(args, cfg, model, device) if "quality" in args.metric else None
    sigma = denoise_std(cfg.train.noise, cfg.train.noise_std)
    denoise = {"off": [None], "on": [sigma], "both": [None, sigma]}[args.denoise]
    settings = sweep_settings(args.guidance, args.attn_temp, annealed=args.annealed, denoise_stds=denoise,
                              inversion=inversion_from_args(args))
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
            if inception is not None and inception.identity.startswith("tiny-random"):
                _stderr("WARNING: --inception tiny-random is a random stand-in for plumbing tests; these are not "
                        "FIDs")
        heldout = None if args.no_bpd else _heldout_bits_per_dim(model, cfg, args, env, device)[0]
        if out_dir is not None and env.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
        title = f"{args.checkpoint}, {weights} weights ({args.num_samples} samples)"
        results = run_sweep(model, inception, reference, settings, out_dir=out_dir, title=title,
                            save_samples=args.save_samples, log=_stderr, rank=env.rank,
                            world_size=env.world_size, num_samples=args.num_samples, base_seed=args.seed,
                            batch_size=batch_size, device=device, precision=precision,
                            max_redraws=args.max_redraws, sample_bpd=not args.no_bpd, heldout_bpd=heldout,
                            classifier=classifier)
        if not env.is_main:
            return 0
        report = {"checkpoint": str(args.checkpoint), "weights": weights, "metric": args.metric,
                  "num_samples": args.num_samples,
                  "ranks": env.world_size, "seed": args.seed, "precision": precision.name,
                  "results": [r.row() for r in results], "notes": notes}
        if with_fid:
            report["inception"] = inception.identity
            report["fid_convention"] = inception.convention
            report["reference"] = {"file": str(args.ref_stats), "n": reference.n, **reference.meta}
            if len(results) == 1:
                report["fid"] = results[0].fid
        if classifier is not None:
            report["classifier"] = _classifier_report(classifier)
            if len(results) == 1:
                report.update({k: getattr(results[0], k) for k in QUALITY_COLUMNS})
        if out_dir is not None:
            (out_dir / "results.json").write_text(json.dumps(report, indent=2) + "\n")
            report["out"] = str(out_dir)
        print(json.dumps(report))
    return 0


def run_stats(args: argparse.Namespace, data_uri: str, overrides: list[str]) -> int:
    """``tarflow eval stats DATA_URI --out FILE [data.key=value ...]`` (``trainer.evaluation.reference``)."""
    from cluster.env import discover
    from data_pipeline import dataset_info
    from trainer.distributed import process_group
    from trainer.evaluation.fid import FIDError, save_stats, stats_suffix
    from trainer.evaluation.inception import load_fid_network, resolve_weights_path
    from trainer.evaluation.reference import compute_reference_stats, data_config_for, stats_file_name
    from trainer.runtime import resolve_device

    suffix = stats_suffix(args.fid_convention)
    if not args.out:
        raise ValueError(f"eval stats needs --out FILE (a {suffix}) or a directory")
    env = discover()
    data_cfg = data_config_for(data_uri, overrides)
    out = Path(args.out)
    if out.is_dir() or args.out.endswith("/"):
        out = out / stats_file_name(data_cfg, dataset_info(data_cfg)[0], args.fid_convention)
    elif out.suffix != suffix:
        raise FIDError(f"--out {out}: {args.fid_convention} statistics are a {suffix} file")
    device = resolve_device(args.device, env.local_rank)
    inception = load_fid_network(resolve_weights_path(args.inception, None, args.fid_convention),
                                 args.fid_convention, device)
    with process_group(env, device):
        stats = compute_reference_stats(data_cfg, args.split, inception, batch_size=args.batch_size or 100,
                                        device=device, rank=env.rank, world_size=env.world_size,
                                        max_images=args.max_images)
        if env.is_main:
            path = save_stats(stats, out, inception.stats_state())
            print(json.dumps({"out": str(path), "n": stats.n, "feature_dim": int(stats.mu.shape[0]),
                              **{k: stats.meta[k] for k in ("split", "image_shape", "convention", "network")}}))
    return 0


def _classifier(args: argparse.Namespace, cfg, model, device):
    """The quality metrics' classifier: ``--classifier FILE``, else the cache file of the checkpoint's data set and
    split (with the data.* overrides); refused for images of another shape or number of classes."""
    from trainer.evaluation.classifier import find_classifier

    c = model.config
    return find_classifier(cfg.data, args.classifier, device, image_shape=(c.in_channels, c.img_size, c.img_size),
                           num_classes=c.num_classes)


def _classifier_report(clf) -> dict:
    from trainer.evaluation.quality import baseline

    keys = ("dataset", "image_shape", "num_classes", "recipe", "train_images", "heldout_images", "heldout_accuracy")
    return {"file": clf.path, **{k: clf.meta[k] for k in keys}, "baseline": baseline(clf)}


def run_classifier_train(args: argparse.Namespace) -> int:
    """``tarflow eval classifier train DATA_URI [data.key=value ...] [--seed S] [--out FILE]``: train the quality
    metrics' classifier on the train split (CPU) and write it to FILE, by default the cache file the metrics find."""
    from cluster.env import discover
    from trainer.evaluation.classifier import Recipe, default_path, save_classifier, train_classifier
    from trainer.evaluation.reference import data_config_for

    if len(args.overrides) < 2 or args.overrides[0] != "train":
        raise ValueError("usage: tarflow eval classifier train DATA_URI [data.key=value ...] [--seed S] [--out FILE]")
    if not discover().is_main:
        return 0
    data_cfg = data_config_for(args.overrides[1], args.overrides[2:])
    recipe = Recipe(seed=args.seed)
    clf = train_classifier(data_cfg, recipe, log=_stderr)
    clf.path = str(save_classifier(clf, args.out or default_path(data_cfg, recipe)))
    print(json.dumps({"out": clf.path, "train_seconds": clf.meta["train_seconds"],
                      "train_accuracy": clf.meta["train_accuracy"], **_classifier_report(clf)}))
    return 0
