"""The sampler's inversion options, spelled once for every command that samples (``tarflow sample``, ``tarflow
eval``): ``--method``, ``--tol``, ``--max-iters``, ``--window``, ``--module-size``."""

from __future__ import annotations

import argparse

from models import METHODS

DEFAULTS = {"method": "sequential", "tol": None, "max_iters": 0, "window": 0, "module_size": 0}


def add_inversion_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="sequential", choices=METHODS,
                   help="how each flow block is inverted: sequential (exact, one token at a time), jacobi (all "
                        "tokens per pass until they move by <= --tol), gs-jacobi (Jacobi inside modules of "
                        "--module-size tokens), auto (per block, whichever this batch makes faster)")
    p.add_argument("--tol", type=float, default=None,
                   help="parallel methods: a token is final once a pass moves it by <= tol (pixel units of [-1, 1]; "
                        "default 1e-4; 0: iterate until exact)")
    p.add_argument("--max-iters", type=int, default=0, help="parallel methods: passes per block (gs-jacobi: per "
                                                            "module); 0: T-1, enough to be exact")
    p.add_argument("--window", type=int, default=0, help="jacobi: tokens updated per pass after the finished ones "
                                                         "(0: all)")
    p.add_argument("--module-size", type=int, default=0, help="gs-jacobi: tokens per module (0: one module)")


def inversion_from_args(args: argparse.Namespace):
    """The ``models.InversionSettings`` the options give (a ValueError names a bad value)."""
    from trainer.evaluation.sampler import inversion_settings

    return inversion_settings(args.method, args.tol, args.max_iters, args.window, args.module_size)
