"""Progress bars for the long evaluation passes (FID sampling, reference statistics): tqdm on stderr, shown only on
rank 0 and only when stderr is a terminal, so that batch-system logs and the other ranks' output stay clean.

Counts are of images over all ranks: rank 0 sees only its share, and every rank works through an equal share, so
rank 0's count times the number of ranks is the whole pass's progress.
"""

from __future__ import annotations

import sys
from typing import IO

from tqdm import tqdm


def progress_bar(total: int, description: str, *, rank: int = 0, unit: str = "img",
                 file: IO[str] | None = None) -> tqdm:
    """A tqdm bar of ``total`` units on ``file`` (stderr), disabled (every call a no-op) on ranks other than 0 and
    when ``file`` is not a TTY. Use it as a context manager, and ``update(n)`` as work is done."""
    stream = file if file is not None else sys.stderr
    shown = rank == 0 and _is_tty(stream)
    return tqdm(total=total, desc=description, unit=unit, file=stream, disable=not shown, leave=False,
                dynamic_ncols=True, unit_scale=True)


def _is_tty(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or foreign stream
        return False
