"""DDP: a full replica per rank, gradients all-reduced in buckets during backward."""

from __future__ import annotations

import contextlib

import torch

from models import TarFlow

from ..config import OptimConfig
from ..distributed import all_ranks_true
from .single import SingleDevice


class DistributedDataParallel(SingleDevice):
    """A full replica per rank; gradients all-reduced in buckets during backward (DDP). Gradients of all but the
    last micro-batch of a step stay local (``no_sync``). Checkpoints hold the plain module's state."""

    name = "ddp"
    distributed = True

    # 25 MB buckets overlap communication with backward for models of this size; views avoid a gradient copy.
    BUCKET_CAP_MB = 25

    def setup(self, model: TarFlow, optim: OptimConfig) -> None:
        super().setup(model, optim)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self._wrapped = torch.nn.parallel.DistributedDataParallel(
            self._module, device_ids=device_ids, bucket_cap_mb=self.BUCKET_CAP_MB, gradient_as_bucket_view=True)

    def accumulating(self) -> contextlib.AbstractContextManager:
        return self._wrapped.no_sync()

    def _on_all_ranks(self, flag: torch.Tensor) -> torch.Tensor:
        return all_ranks_true(flag)
