"""``tarflow train [CONFIG] [key=value ...]``."""

from __future__ import annotations

import argparse

from trainer.config import load_config, split_config_and_overrides


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train (no CONFIG: the embedded digits default)",
                       description="tarflow train [CONFIG.yaml] [section.key=value ...]")
    p.add_argument("rest", nargs="*", metavar="[CONFIG] [key=value ...]")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cluster.env import discover
    from trainer.loop import train

    config_path, overrides = split_config_and_overrides(args.rest)
    # validated for the launch's size: a batch that does not split over torchrun's ranks names their number
    cfg = load_config(config_path, overrides, world_size=discover().world_size)
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
