"""``tarflow sample CKPT --out DIR``: sample grids (PNG + .npz), or the sampling trajectory."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .inversion_args import add_inversion_arguments, inversion_from_args


def add_parser(sub) -> None:
    p = sub.add_parser("sample", help="sample a checkpoint into a PNG grid and an .npz")
    p.add_argument("checkpoint")
    p.add_argument("--num", type=int, default=64)
    p.add_argument("--guidance", type=float, default=0.0)
    p.add_argument("--attn-temp", type=float, default=1.0)
    p.add_argument("--annealed", action="store_true", help="ramp the guidance weight over each block's steps")
    add_inversion_arguments(p)
    p.add_argument("--denoise", action="store_true", help="add the grid after one score-based denoising step")
    p.add_argument("--labels", type=int, nargs="+", help="class labels, cycled (default: 0, 1, 2, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--weights", default=None, choices=["ema", "raw"],
                   help="ema: the run's weight average; raw: the trained weights (default: the average when the "
                        "checkpoint holds one); the file names say which")
    p.add_argument("--precision", default="fp32", choices=["auto", "fp32", "bf16"])
    p.add_argument("--trajectory", action="store_true",
                   help="write trajectory.png/.npz instead: the image after each inverted flow block (rows: "
                        "samples, columns: noise, then each block; with --denoise a last denoised column)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from trainer.evaluation.grids import sample_grids, save_grids
    from trainer.evaluation.loading import load_model
    from trainer.evaluation.sampler import SamplingSettings, finite_rows, fixed_noise_and_labels
    from trainer.noise import denoise_std
    from trainer.runtime import resolve_device, resolve_precision

    device = resolve_device(args.device)
    model, cfg, weights = load_model(args.checkpoint, device, args.weights)
    noise, labels = fixed_noise_and_labels(model, args.num, args.seed)
    if args.labels is not None:
        if not model.config.num_classes:
            raise ValueError("--labels given but the model is unconditional")
        labels = torch.tensor([args.labels[i % len(args.labels)] for i in range(args.num)])
    sigma = denoise_std(cfg.train.noise, cfg.train.noise_std) if args.denoise else None
    settings = SamplingSettings(args.guidance, args.attn_temp, args.annealed, sigma, inversion_from_args(args))
    precision = resolve_precision(args.precision, device, "gaussian")
    if args.trajectory:
        from trainer.evaluation.trajectory import sampling_trajectory, save_trajectory

        trajectory, names = sampling_trajectory(model, noise, labels, settings, device=device, precision=precision)
        for p in save_trajectory(trajectory, names, Path(args.out), labels, prefix=f"{weights}_"):
            print(p)
        bad = int((~finite_rows(trajectory[:, -1])).sum())
        if bad:
            print(f"warning: {bad} samples with NaN/Inf values", file=sys.stderr)
        return 0
    result = sample_grids(model, noise, labels, [settings], device=device, precision=precision)
    for p in save_grids(result, Path(args.out), f"{weights}_", labels):
        print(p)
    for name, passes in result.passes.items():
        print(f"{name}: {args.method} passes per block (last block first, T-1 = "
              f"{model.config.num_patches - 1}): {' '.join(map(str, passes))}", file=sys.stderr)
    bad = {k: v for k, v in result.nonfinite.items() if v}
    if bad:
        print(f"warning: samples with NaN/Inf values: {bad}", file=sys.stderr)
    return 0
