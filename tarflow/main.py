"""The parser root and the one error handler: the project's expected errors become one line and exit code 2."""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from cluster.launch_cli import add_launch_parser
from data_pipeline.storage import DataSourceError
from scaling.cli import add_scale_parser
from trainer.checkpoint import CheckpointError
from trainer.config import ConfigError
from trainer.loop import NonFiniteLossError
from trainer.stores import StoreError

from . import ckpt, data, evaluate, sample, train
from .launch import check_launch_config

# What a user can mend (a config key, a path, a flag, a learning rate that diverged): one line, no traceback, unless
# TARFLOW_DEBUG=1. Anything else is a bug and shows one. (The packages may not share a base class: models, cluster and
# data_pipeline import nothing of ours, so the list is kept here, where they all meet.)
EXPECTED_ERRORS = (ConfigError, CheckpointError, ValueError, DataSourceError, StoreError, NonFiniteLossError,
                   ImportError)
USAGE_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tarflow", description="Train and use TarFlow normalizing flows.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (train, sample, evaluate, data, ckpt):
        command.add_parser(sub)
    add_launch_parser(sub, check_config=check_launch_config)
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
    except EXPECTED_ERRORS as e:
        if os.environ.get("TARFLOW_DEBUG", "0") not in ("", "0"):
            traceback.print_exc()
        # One write with its newline: the ranks of a launch share one stderr, and print() writes the line and its
        # end separately, so two ranks' lines could run together.
        sys.stderr.write(f"tarflow {args.command}: error: {e}\n")
        sys.stderr.flush()
        return USAGE_ERROR
