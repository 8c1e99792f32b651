"""FSDP2 (``fully_shard``): parameters, gradients and optimizer state sharded over the ranks."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from models import TarFlow

from ..checkpoint.files import load_torch_file
from ..config import FSDPConfig, OptimConfig
from ..distributed import all_ranks_true
from ..optim import build_optimizer
from .single import SingleDevice


class FullyShardedDataParallel(SingleDevice):
    """FSDP2 (``fully_shard``): parameters, gradients and optimizer state sharded over the ranks, each transformer
    layer (``fsdp.unit=layer``) or flow block (``block``) one unit gathered for its forward and backward, the rest
    in the root unit; ``fsdp.hybrid`` shards within a node and replicates across nodes.

    Mixed precision: with bf16 autocast the units compute in bf16 and reduce gradients in fp32 (log-likelihood
    training is sensitive to low-precision reductions). Checkpoints are sharded ``torch.distributed.checkpoint``
    directories (every rank writes its shards), which load into any number of ranks (resharding) and consolidate
    into one model in one process for export. ``reverse`` and ``denoise`` run inside ``inference()``: every unit
    is gathered once for the duration instead of once per decoded token.
    """

    name = "fsdp"
    distributed = True

    def __init__(self, device: torch.device, compute_dtype: torch.dtype | None = None,
                 options: FSDPConfig | None = None, nodes: int = 1):
        super().__init__(device)
        self.compute_dtype = compute_dtype
        self.options = options or FSDPConfig()
        self.nodes = nodes

    def setup(self, model: TarFlow, optim: OptimConfig) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        o = self.options
        model = model.to(self.device)
        reduce_dtype = torch.bfloat16 if o.reduce_dtype == "bf16" else torch.float32
        policy = MixedPrecisionPolicy(param_dtype=self.compute_dtype, reduce_dtype=reduce_dtype) \
            if self.compute_dtype is not None else MixedPrecisionPolicy(reduce_dtype=reduce_dtype)
        mesh = None
        if o.hybrid:  # (replicate over nodes, shard within a node): HSDP
            world = torch.distributed.get_world_size()
            if world % self.nodes:
                raise ValueError(f"fsdp.hybrid needs the same number of ranks on every node: {world} ranks, "
                                 f"{self.nodes} nodes")
            mesh = init_device_mesh(self.device.type, (self.nodes, world // self.nodes),
                                    mesh_dim_names=("replicate", "shard"))
        kwargs = dict(mesh=mesh, mp_policy=policy, reshard_after_forward=o.reshard_after_forward,
                      offload_policy=CPUOffloadPolicy() if o.cpu_offload else OffloadPolicy())
        units = [layer for block in model.blocks for layer in block.attn_blocks] if o.unit == "layer" \
            else list(model.blocks)
        for unit in units:
            fully_shard(unit, **kwargs)
        fully_shard(model, **kwargs)
        self._module = self._wrapped = model
        self.optimizer = build_optimizer(model, optim)

    @property
    def replicated(self) -> bool:
        return False

    def _units(self) -> list[nn.Module]:
        return [m for m in self._module.modules() if hasattr(m, "unshard") and hasattr(m, "reshard")]

    @contextlib.contextmanager
    def accumulating(self):
        self._module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self._module.set_requires_gradient_sync(True)

    @contextlib.contextmanager
    def inference(self, weights: str = "raw"):
        with self._weights_in_place(weights), self._gathered() as model:  # the average's shards, then gathered
            yield model

    @contextlib.contextmanager
    def _gathered(self):
        units = self._units()
        for unit in units:  # denoise runs a backward: keep the units gathered through it as well
            unit.set_reshard_after_forward(False)
            unit.set_reshard_after_backward(False)
            unit.unshard()
        try:
            yield self._module
        finally:
            for unit in units:
                unit.reshard()
                unit.set_reshard_after_forward(self.options.reshard_after_forward)  # as set up (root included)
                unit.set_reshard_after_backward(True)

    def _on_all_ranks(self, flag: torch.Tensor) -> torch.Tensor:
        return all_ranks_true(flag)

    # torch.distributed.checkpoint: every rank writes its own shards, rank 0 the metadata; loads into any number of
    # ranks (resharding), and into one process for export.
    checkpoint_format = "dcp"

    def _options(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions
        return StateDictOptions(full_state_dict=True, cpu_offload=True)

    def full_model_state_dict(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        return get_model_state_dict(self._module, options=self._options())

    def _state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optimizer = get_state_dict(self._module, self.optimizer)
        state = {"model": model, "optimizer": optimizer}
        if self.ema is not None:  # its DTensors are sharded like the parameters, and reshard like them on load
            state["ema"] = self.ema.state_dict()
        return state

    def save_state(self, directory: Path) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(), storage_writer=dcp.FileSystemWriter(directory))

    def load_state(self, directory: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        reader = dcp.FileSystemReader(directory)
        state = self._state()
        saved_average = any(key.startswith("ema.") for key in reader.read_metadata().state_dict_metadata)
        if "ema" in state and not saved_average:  # train.ema switched on at this resume: it starts from here
            del state["ema"]
        dcp.load(state, storage_reader=reader)
        set_state_dict(self._module, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        if self.ema is not None:
            if "ema" in state:
                self.ema.updates = int(state["ema"]["updates"])  # the averages were loaded in place
            else:
                self.ema.reset(self.ema_sources())

    @classmethod
    def export_model_state(cls, directory: Path, weights: str = "raw") -> dict[str, torch.Tensor] | None:
        import tempfile

        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        from .single import with_weights

        with tempfile.TemporaryDirectory() as tmp:
            dcp_to_torch_save(directory, Path(tmp) / "full.pt")
            state = load_torch_file(Path(tmp) / "full.pt", shown_as=directory)
        return with_weights(state["model"], state.get("ema"), weights)
