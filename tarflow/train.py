"""``tarflow train [CONFIG] [key=value ...] [--print-config | --dry-run [--world-size N] [--nodes K]
[--all-strategies]]``."""

from __future__ import annotations

import argparse

from trainer.config import load_config, split_config_and_overrides, to_yaml


def _add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config as YAML (a CONFIG that gives the same run) and exit")
    p.add_argument("--dry-run", action="store_true",
                   help="check config, data, storage and the resume decision, print the memory plan, and exit "
                        "without writing anything (exit code 2, after the plan, when a check failed)")
    p.add_argument("--world-size", type=int, default=None, metavar="N",
                   help="with --dry-run or --print-config: plan for N data-parallel ranks instead of this launch's")
    p.add_argument("--nodes", type=int, default=1, metavar="K",
                   help="with --world-size: the N ranks are on K nodes (fsdp.hybrid shards within a node)")
    p.add_argument("--all-strategies", action="store_true",
                   help="with --dry-run: also a table of the per-rank memory under ddp, fsdp and DeepSpeed ZeRO-1/2/3")


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train (no CONFIG: the embedded digits default)",
                       description="tarflow train [CONFIG.yaml] [section.key=value ...] [flags]")
    _add_flags(p)
    # The flags may also come after CONFIG and the overrides (argparse stops at the first positional otherwise).
    p.add_argument("rest", nargs=argparse.REMAINDER, metavar="[CONFIG] [key=value ...]")
    p.set_defaults(func=run)


def _split_flags(args: argparse.Namespace) -> argparse.Namespace:
    """The flags given among CONFIG and the overrides, merged with those given before them."""
    later = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    _add_flags(later)
    flags, rest = later.parse_known_args(args.rest)
    unknown = [a for a in rest if a.startswith("-")]
    if unknown:
        raise ValueError(f"tarflow train does not know the option {unknown[0]!r}; its options are --print-config, "
                         f"--dry-run, --world-size N, --nodes K and --all-strategies (see tarflow train --help)")
    merged = argparse.Namespace(**vars(args))
    merged.rest = rest
    merged.print_config = args.print_config or flags.print_config
    merged.dry_run = args.dry_run or flags.dry_run
    merged.world_size = flags.world_size if flags.world_size is not None else args.world_size
    merged.nodes = flags.nodes if flags.nodes != 1 else args.nodes
    merged.all_strategies = args.all_strategies or flags.all_strategies
    return merged


def _planned_env(args: argparse.Namespace):
    """This process's launch, or the one --world-size and --nodes describe (one process per device, torchrun)."""
    from cluster.env import ProcessEnv, discover

    if args.world_size is None:
        if args.nodes != 1:
            raise ValueError("--nodes goes with --world-size N (the ranks of the planned launch)")
        return discover()
    n, k = args.world_size, args.nodes
    if n < 1 or k < 1 or n % k:
        raise ValueError(f"--world-size {n} --nodes {k}: the ranks must be a positive multiple of the nodes")
    return ProcessEnv(world_size=n, local_world_size=n // k, scheduler="torchrun" if n > 1 else "none")


def run(args: argparse.Namespace) -> int:
    args = _split_flags(args)
    config_path, overrides = split_config_and_overrides(args.rest)
    if (args.world_size is not None or args.nodes != 1) and not (args.dry_run or args.print_config):
        raise ValueError("--world-size and --nodes plan a launch: use them with --dry-run or --print-config "
                         "(a real launch's size comes from torchrun)")
    if args.all_strategies and not args.dry_run:
        raise ValueError("--all-strategies adds a table to the dry run's memory plan: use it with --dry-run")
    env = _planned_env(args)
    # validated for the launch's size: a batch that does not split over torchrun's ranks names their number
    cfg = load_config(config_path, overrides, world_size=env.world_size)
    if args.print_config:
        if env.is_main:
            print(to_yaml(cfg), end="")
        return 0
    if args.dry_run:
        from trainer.dry_run import dry_run

        report = dry_run(cfg, env, all_strategies=args.all_strategies)
        if env.is_main:
            print(report.format(cfg), flush=True)
        if report.problems:  # after the plan: it is computed from the config alone and holds whatever they say
            raise ValueError(f"dry run: {len(report.problems)} check(s) failed (FAIL above): "
                             + "; ".join(report.problems))
        return 0
    from trainer.loop import train

    result = train(cfg, env)
    if result.preempted:
        print(f"stopped at step {result.step} ({result.preempted}); checkpoint {result.checkpoint}; exit code "
              f"{cfg.preemption.exit_code} asks the scheduler to requeue", flush=True)
        return cfg.preemption.exit_code
    if result.sample_grids:  # the rank that wrote the outputs reports them
        start = "n/a" if result.initial_bits_per_dim is None else f"{result.initial_bits_per_dim:.4f}"
        which = " (weight average)" if result.weights == "ema" else ""
        print(f"done: step {result.step}, held-out bits/dim{which} {start} → {result.final_bits_per_dim:.4f}; "
              f"checkpoint {result.checkpoint}; samples {result.sample_grids[0].parent}")
    return 0
