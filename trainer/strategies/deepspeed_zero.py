"""DeepSpeed ZeRO stage 1, 2 or 3: DeepSpeed's engine owns the optimizer state partitioning, gradient reduction,
clipping and (with bf16) the fp32 master weights. Our AdamW is the client optimizer and our schedule sets its
learning rate, so the mathematics is the other strategies'."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from models import TarFlow

from ..checkpoint.files import CheckpointError, load_torch_file
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
    def inference(self, weights: str = "raw"):
        average = weights == "ema" and self.ema is not None
        if self.stage < 3 and not average:
            yield self.engine.module
            return
        # ZeRO-3's hooks release parameters after every module forward and backward, even inside
        # GatheredParameters, so denoise's backward would leave the next reverse with empty partitions: sample from
        # a plain copy of the full fp32 weights instead (the memory a full gather takes anyway). The average exists
        # only as fragments of the partitioned master copy, so it is gathered the same way at every stage.
        module = self.engine.module
        replica = type(module)(module.config).to(self.device)
        replica.load_state_dict(self.full_ema_state_dict() if average else self.full_model_state_dict())
        replica.train(module.training)
        yield replica

    def evaluating(self, weights: str = "raw"):
        if weights == "ema" and self.ema is not None:
            return self.inference(weights)  # the average is gathered into a replica
        return contextlib.nullcontext(self.engine.module)

    # ---------------------------------------------------------------- the weight average: the fp32 master's fragments
    def _fragments(self) -> dict[str, tuple[torch.Tensor, int]]:
        """Per parameter, this rank's slice of DeepSpeed's fp32 master copy and where it starts in the flattened
        parameter. Stages 1 and 2 partition the flat buffer of a parameter group, so a rank may hold a piece of a
        parameter or none of it; stage 3 gives every rank an equal slice of each parameter (the last one padded)."""
        fragments = {}
        for name, p in self.engine.module.named_parameters():
            if self.stage == 3:
                from deepspeed.utils import safe_get_local_fp32_param
                fragments[name] = (safe_get_local_fp32_param(p), self.engine.global_rank * p.ds_tensor.ds_numel)
            elif getattr(p, "_hp_mapping", None) is not None:
                fragments[name] = (p._hp_mapping.get_hp_fragment(), p._hp_mapping.lp_fragment_address.start)
        return fragments

    def ema_sources(self) -> dict[str, torch.Tensor]:
        return {name: fragment for name, (fragment, _) in self._fragments().items()}

    def full_ema_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective: each rank writes its fragments into a zero tensor of the full parameter, one sum over the
        ranks assembles it (what DeepSpeed's own get_full_hp_param does for the master weights)."""
        import torch.distributed as dist

        if self.ema is None:
            return self.full_model_state_dict()
        starts = {name: start for name, (_, start) in self._fragments().items()}
        state = {k: b.detach().cpu().clone() for k, b in self.engine.module.named_buffers()}
        for name, p in self.engine.module.named_parameters():
            shape = p.ds_shape if self.stage == 3 else p.shape
            full = torch.zeros(torch.Size(shape).numel(), dtype=torch.float32, device=self.device)
            if name in starts:
                _place(full, self.ema.averages[name], starts[name])
            dist.all_reduce(full)
            state[name] = full.view(shape).cpu()
        return state

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

    EMA = "ema-rank{rank:05d}.pt"  # each rank's fragments of the weight average, with where they start
    EMA_FILES = "ema-rank*.pt"

    def save_state(self, directory: Path) -> None:
        self.engine.save_checkpoint(str(directory), tag=self.TAG, save_latest=False)
        if self.engine.global_rank == 0:
            torch.save({k: b.detach().cpu() for k, b in self.engine.module.named_buffers()}, directory / self.BUFFERS)
        if self.ema is not None:
            shapes = {name: tuple(p.ds_shape if self.stage == 3 else p.shape)
                      for name, p in self.engine.module.named_parameters()}
            starts = {name: start for name, (_, start) in self._fragments().items()}
            torch.save({**self.ema.state_dict(), "starts": starts, "shapes": shapes},
                       directory / self.EMA.format(rank=self.engine.global_rank))

    def load_state(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(directory), tag=self.TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=False, load_module_strict=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint under {directory}/{self.TAG}")
        if self.ema is None:
            return
        file = directory / self.EMA.format(rank=self.engine.global_rank)
        if not file.exists():  # written without an average (train.ema switched on at this resume)
            self.ema.reset(self.ema_sources())
            return
        saved = load_torch_file(file, map_location=self.device)
        starts = {name: start for name, (_, start) in self._fragments().items()}
        if saved["starts"] != starts:
            raise CheckpointError(f"{file}: its weight-average fragments start elsewhere than this run's partition "
                                  f"(another DeepSpeed layout); resume with the stage and ranks it was written by")
        self.ema.load_state_dict(saved, shown_as=str(file))

    @classmethod
    def export_model_state(cls, directory: Path, weights: str = "raw") -> dict[str, torch.Tensor] | None:
        buffers = load_torch_file(directory / cls.BUFFERS)
        if weights == "ema":
            files = sorted(directory.glob(cls.EMA_FILES))
            return {**_assemble_average(files), **buffers} if files else None
        require_deepspeed()
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = dict(get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=cls.TAG))
        state.update(buffers)
        return state


def _place(full: torch.Tensor, fragment: torch.Tensor, start: int) -> None:
    """Write ``fragment`` into the flat ``full`` at ``start``; a ZeRO-3 slice's padding past the end is dropped."""
    n = min(fragment.numel(), full.numel() - start)
    full[start:start + n] = fragment.reshape(-1)[:n].to(full.device)


def _assemble_average(files: list[Path]) -> dict[str, torch.Tensor]:
    """The full averaged parameters from every rank's fragment file, in one process."""
    shapes, full = None, {}
    for file in files:
        saved = load_torch_file(file)
        if shapes is None:
            shapes = saved["shapes"]
            full = {name: torch.zeros(torch.Size(shape).numel()) for name, shape in shapes.items()}
        for name, start in saved["starts"].items():
            _place(full[name], saved["averages"][name], start)
    return {name: flat.view(shapes[name]) for name, flat in full.items()}
