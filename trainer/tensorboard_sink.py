"""TensorBoard: the run's scalars and sample grids as event files (``torch.utils.tensorboard.SummaryWriter``).

``logging.tensorboard=true``; the events go to ``run_dir/tensorboard``, or, with ``logging.tensorboard_dir`` (a
directory several runs share, e.g. a scaling study's), to ``tensorboard_dir/<run name>``, which is what TensorBoard
shows as the run's name: ``tensorboard --logdir DIR`` then lists every run side by side.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np

from .config import LoggingConfig


def tensorboard_log_dir(cfg: LoggingConfig, run_dir: str | os.PathLike) -> Path:
    """``run_dir/tensorboard``, or ``tensorboard_dir/<logging.run_name or run_dir's name>`` for a shared one."""
    if not cfg.tensorboard_dir:
        return Path(run_dir) / "tensorboard"
    return Path(cfg.tensorboard_dir) / (cfg.run_name or Path(run_dir).name)


class TensorBoardSink:
    """Scalars by their metric names (``train/loss``, ``eval/bits_per_dim``; stored as float32, as TensorBoard
    does) and images (``log_images``: tag → (H, W, 3) uint8 grid) at the step they belong to.

    ``resumed_step``: a run continued from the checkpoint at that step logs the steps after it again; the writer's
    ``purge_step`` makes TensorBoard drop what an earlier attempt logged after it (as ``JsonlSink`` truncates
    ``metrics.jsonl``), so a resumed run shows one curve, not two overlapping ones."""

    def __init__(self, log_dir: str | os.PathLike, resumed_step: int = 0, flush_secs: int = 30):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # torch's module imports the tensorboard package
            raise ImportError(f"logging.tensorboard=true needs the tensorboard package ({e}): pip install "
                              f"tensorboard, or set logging.tensorboard=false") from None
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=resumed_step + 1, flush_secs=flush_secs)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        for name, value in metrics.items():
            self._writer.add_scalar(name, float(value), global_step=int(step))

    def log_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        for tag, grid in images.items():
            self._writer.add_image(tag, np.asarray(grid), global_step=int(step), dataformats="HWC")
        self._writer.flush()  # grids are rare and the point of looking: do not leave them in the queue

    def close(self) -> None:
        self._writer.close()

    def describe(self) -> str:
        return f"tensorboard {self.log_dir}"
