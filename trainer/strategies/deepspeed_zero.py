"""DeepSpeed ZeRO stage 1, 2 or 3: DeepSpeed's engine owns the optimizer state partitioning, gradient reduction,
clipping and (with bf16) the fp32 master weights. Our AdamW is the client optimizer and our schedule sets its
learning rate, so the mathematics is the other strategies'."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from models import TarFlow

from ..checkpoint.files import load_torch_file
from ..config import OptimConfig
from ..optim import parameter_groups
from .base import StepResult, Strategy


def require_deepspeed():
    """Import DeepSpeed, or say how to get it (checked before any process group is made)."""
    try:
        import deepspeed
    except ImportError as e:
        raise ImportError(f"train.strategy=deepspeed needs the deepspeed package ({e}); install it with "
                          f"`pip install -e \".[deepspeed]\"` (DS_BUILD_OPS=0: no ops need prebuilding), or choose "
                          f"train.strategy=fsdp") from None
    # On the CPU accelerator DeepSpeed's comm backend JIT-compiles a shared-memory all-reduce when it starts (about
    # a minute of C++ on every fresh install), used only by its inference all-reduce; training reduces through
    # torch.distributed. Marking the op unavailable lets the backend start without it.
    if deepspeed.get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


class DeepSpeedZeRO(Strategy):
    """``deepspeed.initialize`` over the model with a config dict from ``build_deepspeed_config``.

    The engine runs with ``managed_gradient_accumulation=false``: ``backward`` only accumulates, and ``step`` is the
    boundary that reduces, clips and updates; a non-finite gradient norm makes the engine skip the update on every
    rank. Stage 3 partitions the parameters too: ``inference()`` gathers them for ``reverse`` and ``denoise``.
    """

    name = "deepspeed"

    def __init__(self, device: torch.device, ds_config: dict):
        self.device = device
        self.ds_config = ds_config
        self.stage = ds_config["zero_optimization"]["stage"]

    def setup(self, model: TarFlow, optim: OptimConfig) -> None:
        deepspeed = require_deepspeed()
        model = model.to(self.device)
        bf16 = self.ds_config["bf16"]["enabled"]
        # With bf16 the engine casts the module to bf16 first and makes its fp32 masters from that cast, which
        # would round the initial (or imported) weights to bf16; the exact values are put back into the masters.
        exact = {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters()} if bf16 else {}
        betas, eps = tuple(optim.betas), optim.eps
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=parameter_groups(model, optim), config=self.ds_config,
            optimizer=lambda groups: torch.optim.AdamW(groups, lr=optim.lr, betas=betas, eps=eps))
        if exact:
            from deepspeed.utils import safe_set_full_fp32_param
            for name, p in self.engine.module.named_parameters():
                safe_set_full_fp32_param(p, exact.pop(name).to(self.device))

    @property
    def model(self) -> nn.Module:
        return self.engine

    @property
    def unwrapped(self) -> TarFlow:
        return self.engine.module

    @property
    def replicated(self) -> bool:
        return self.stage < 3

    @contextlib.contextmanager
    def inference(self):
        if self.stage < 3:
            yield self.engine.module
            return
        # ZeRO-3's hooks release parameters after every module forward and backward, even inside
        # GatheredParameters, so denoise's backward would leave the next reverse with empty partitions: sample from
        # a plain copy of the full fp32 weights instead (the memory a full gather takes anyway).
        module = self.engine.module
        replica = type(module)(module.config).to(self.device)
        replica.load_state_dict(self.full_model_state_dict())
        replica.train(module.training)
        yield replica

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # the loop already divides by the accumulation steps

    def step(self, lr: float, max_grad_norm: float, loss_is_finite: torch.Tensor) -> StepResult:
        # Clipping is configured once (gradient_clipping); max_grad_norm is the same number, from optim.grad_clip.
        # loss_is_finite is implied: a non-finite loss gives non-finite gradients, which the engine detects.
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return StepResult(grad_norm=float(norm) if norm is not None else float("nan"),
                          applied=bool(self.engine.was_step_applied()))

    def full_model_state_dict(self) -> dict[str, torch.Tensor]:
        """From the fp32 master weights (with bf16 the module holds only bf16 copies); gathered for stage 3."""
        from deepspeed.utils import safe_get_full_fp32_param

        module = self.engine.module
        params = dict(module.named_parameters())
        return {key: (safe_get_full_fp32_param(params[key]) if key in params else value).detach().cpu().clone()
                for key, value in module.state_dict().items()}

    def can_resume(self, manifest, world_size: int) -> str | None:
        if manifest.checkpoint_format == self.checkpoint_format and manifest.world_size != world_size:
            return (f"was written by {manifest.world_size} ranks as a DeepSpeed checkpoint, which resumes only on "
                    f"as many (this run has {world_size}); FSDP checkpoints reshard")
        return super().can_resume(manifest, world_size)

    # The engine's own format: model states by rank 0 (stage 3: every rank its partition), optimizer partitions by
    # every rank. It resumes on the same number of ranks; export consolidates it in one process.
    checkpoint_format = "deepspeed"
    TAG = "deepspeed"
    BUFFERS = "buffers.pt"  # the prior's variance: a buffer, which zero_to_fp32 does not export

    def save_state(self, directory: Path) -> None:
        self.engine.save_checkpoint(str(directory), tag=self.TAG, save_latest=False)
        if self.engine.global_rank == 0:
            torch.save({k: b.detach().cpu() for k, b in self.engine.module.named_buffers()}, directory / self.BUFFERS)

    def load_state(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(directory), tag=self.TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=False, load_module_strict=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint under {directory}/{self.TAG}")

    @classmethod
    def export_model_state(cls, directory: Path) -> dict[str, torch.Tensor]:
        require_deepspeed()
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = dict(get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=cls.TAG))
        state.update(load_torch_file(directory / cls.BUFFERS))
        return state
