"""TarFlow (Zhai et al., ICML 2025): a stack of causal-transformer autoregressive affine flows over image
patches, with alternating token order. See ``shared/TARFLOW.md`` for the reference semantics this follows."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Collection, Mapping, Sequence

import torch
from torch import nn

from .config import TarFlowConfig
from .flow_block import FlowBlock
from .inversion import DEFAULT_INIT, DEFAULT_TOL, BlockStats, InversionSettings, invert_block
from .inversion_costs import CostModel
from .reference_config import check_exportable, check_importable, load_reference_file

VAR_EMA_RATE = 0.1  # the reference's VAR_LR for the volume-preserving prior


class TarFlow(nn.Module):
    """``z, logdets = model(x, y)`` maps images (B, C, S, S) to latents in patch layout (B, T, D) and the
    per-dimension log|det| summed over blocks (B,). ``model.reverse(noise, ...)`` samples images."""

    var: torch.Tensor

    def __init__(self, config: TarFlowConfig):
        super().__init__()
        self.config = config
        c = config
        self.blocks = nn.ModuleList([
            FlowBlock(c.patch_dim, c.channels, c.num_patches, c.layers_per_block, c.head_dim, c.expansion,
                      c.nvp, c.num_classes, flip=bool(i % 2))
            for i in range(c.num_blocks)
        ])
        # Prior variance; only used when sampling. Stays 1 for affine (nvp) flows, tracks E[z^2] otherwise.
        self.register_buffer("var", torch.ones(c.num_patches, c.patch_dim))

    # ---------------------------------------------------------------- layout
    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) → (B, T, D): tokens row-major over the patch grid, features channel-major (ch, i, j)."""
        B, C, S, _ = x.shape
        p, g = self.config.patch_size, S // self.config.patch_size
        return x.reshape(B, C, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, C * p * p)

    def unpatchify(self, z: torch.Tensor) -> torch.Tensor:
        B = z.shape[0]
        c = self.config
        p, g = c.patch_size, c.img_size // c.patch_size
        return z.reshape(B, g, g, c.in_channels, p, p).permute(0, 3, 1, 4, 2, 5).reshape(
            B, c.in_channels, c.img_size, c.img_size)

    # ---------------------------------------------------------------- checks
    def _check_images(self, x: torch.Tensor) -> None:
        c = self.config
        if x.dim() != 4 or tuple(x.shape[1:]) != (c.in_channels, c.img_size, c.img_size):
            raise ValueError(f"expected images of shape (B, {c.in_channels}, {c.img_size}, {c.img_size}), "
                             f"got {tuple(x.shape)}")

    def _check_latents(self, z: torch.Tensor) -> None:
        c = self.config
        if z.dim() != 3 or tuple(z.shape[1:]) != (c.num_patches, c.patch_dim):
            raise ValueError(f"expected latents in patch layout (B, {c.num_patches}, {c.patch_dim}), "
                             f"got {tuple(z.shape)}")

    def _check_labels(self, y: torch.Tensor | None, batch: int) -> None:
        if y is None:
            return
        n = self.config.num_classes
        if n == 0:
            raise ValueError("labels were given to an unconditional model (num_classes=0); pass y=None")
        if y.dtype not in (torch.int64, torch.int32) or tuple(y.shape) != (batch,):
            raise ValueError(f"labels must be an integer tensor of shape ({batch},), got {y.dtype} "
                             f"{tuple(y.shape)}")
        if torch.compiler.is_compiling():
            return
        bad = (y < -1) | (y >= n)
        if bool(bad.any()):
            raise ValueError(f"labels must lie in [0, {n}) or be -1 (dropped label); got {y[bad].tolist()}")

    # ---------------------------------------------------------------- density
    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, return_outputs: bool = False):
        """Images → ``(z, logdets)``; with ``return_outputs`` also the list of every block's output.

        Label −1 (dropped, for classifier-free guidance) and ``y=None`` both use the mean class embedding."""
        self._check_images(x)
        self._check_labels(y, x.shape[0])
        z = self.patchify(x)
        logdets = torch.zeros((), dtype=torch.float32, device=x.device)
        outputs = []
        for block in self.blocks:
            z, logdet = block(z, y)
            logdets = logdets + logdet
            outputs.append(z)
        return (z, logdets, outputs) if return_outputs else (z, logdets)

    @staticmethod
    def loss(z: torch.Tensor, logdets: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood per dimension in nats, without the constant ½·ln 2π, averaged over the batch."""
        return 0.5 * z.pow(2).mean() - logdets.mean()

    @staticmethod
    def per_sample_loss(z: torch.Tensor, logdets: torch.Tensor) -> torch.Tensor:
        """The same quantity per sample, (B,)."""
        return 0.5 * z.pow(2).mean(dim=(1, 2)) - logdets

    @torch.no_grad()
    def update_prior(self, z_second_moment: torch.Tensor) -> None:
        """EMA of the prior variance towards E[z²] (T, D), for volume-preserving flows. In data-parallel
        training pass the second moment averaged over all ranks so that every replica's ``var`` agrees."""
        self.var.lerp_(z_second_moment.to(self.var.dtype), VAR_EMA_RATE)

    def denoise(self, x: torch.Tensor, y: torch.Tensor | None = None, *, noise_std: float) -> torch.Tensor:
        """One score step ``x + σ²·∇ₓ log p(x)`` (Tweedie's formula for x = clean + σ·ε).

        The score is the gradient of each sample's own log-density, so the result is independent of how many
        samples are denoised together (the reference's step size scales with its batch)."""
        n_dims = self.config.num_patches * self.config.patch_dim
        with torch.inference_mode(False), torch.enable_grad():
            x_in = x.detach().clone().requires_grad_(True)
            z, logdets = self(x_in, y)
            log_density_sum = -n_dims * self.per_sample_loss(z, logdets).sum()
            (score,) = torch.autograd.grad(log_density_sum, x_in)
        return (x_in + noise_std ** 2 * score.to(x_in.dtype)).detach()

    # ---------------------------------------------------------------- sampling
    @torch.no_grad()
    def reverse(self, noise: torch.Tensor, y: torch.Tensor | None = None, guidance: float = 0.0,
                guide_what: str = "ab", attn_temp: float = 1.0, annealed_guidance: bool = False,
                return_sequence: bool = False, y_minus1_as_last_class: bool = False, *,
                method: str | Sequence[str] = "sequential", tol: float = DEFAULT_TOL, max_iters: int | None = None,
                window: int | None = None, module_size: int | None = None,
                tough_blocks: Collection[int] | None = None, init: str | Sequence[str] = DEFAULT_INIT,
                costs: CostModel | None = None, stats: list[BlockStats] | None = None):
        """Patch-layout noise (B, T, D) → images (B, C, S, S), inverting the blocks last to first.

        Guidance (``guidance > 0``): every parameter θ ∈ ``guide_what`` ("a" log-scale, "b" shift) becomes
        ``θ + g(θ − θ_uncond)``, where the unconditional branch uses the mean class embedding and attention
        temperature ``attn_temp`` (for unconditional models this is attention-temperature guidance). Both
        branches run as one batch. ``annealed_guidance`` ramps g linearly to ``guidance`` over each block's steps.

        ``y_minus1_as_last_class`` reproduces the reference sampler, where label −1 selects the last class;
        by default −1 means "dropped" (mean class embedding), as in training. ``return_sequence`` returns the
        starting noise and the image after each inverted block (N + 1 images).

        ``method`` inverts each block with the exact sequential sampler (the default), "jacobi", "gs-jacobi" or
        "auto" (per block, whichever the batch at hand makes faster), or one of them per block (indexed like
        ``self.blocks``); ``tol``, ``max_iters``, ``window``, ``module_size``, ``tough_blocks``, ``init`` and
        ``costs`` tune the parallel methods (``models.inversion.InversionSettings``). With ``tol=0`` and the
        default ``max_iters`` (T-1 passes) they give the sequential result up to floating-point differences
        between the chunked and one-token kernels; with ``tol > 0`` a token is final once a pass moves it by
        <= tol. ``stats``, a list, receives one ``BlockStats`` per block in inversion order (last block first).
        """
        settings = InversionSettings(method=method, tol=tol, max_iters=max_iters, window=window,
                                     module_size=module_size, tough_blocks=tough_blocks, init=init, costs=costs)
        settings.check_blocks(len(self.blocks))
        self._check_latents(noise)
        B = noise.shape[0]
        self._check_labels(y, B)
        if not set(guide_what) <= {"a", "b"}:
            raise ValueError(f"guide_what must be a combination of 'a' and 'b', got {guide_what!r}")
        if attn_temp <= 0:
            raise ValueError(f"attn_temp must be positive, got {attn_temp}")
        if y is not None and y_minus1_as_last_class:
            y = y.remainder(self.config.num_classes)
        guided = guidance > 0 and bool(guide_what)
        weights, q_scale = self._guidance_tables(B, guidance, guide_what, attn_temp, annealed_guidance, noise) \
            if guided else (None, None)
        kv_cache = self._allocate_kv_cache(B * (2 if guided else 1), noise.device)

        x = noise * self.var.sqrt()
        sequence = [self.unpatchify(x)] if return_sequence else None
        for k in reversed(range(len(self.blocks))):
            block = self.blocks[k]
            x, block_stats = invert_block(block, k, x, block.decode_bias(y, guided), kv_cache, weights, q_scale,
                                          settings)
            if stats is not None:
                stats.append(block_stats)
            if sequence is not None:
                sequence.append(self.unpatchify(x))
        return sequence if sequence is not None else self.unpatchify(x)

    def _guidance_tables(self, batch: int, guidance: float, guide_what: str, attn_temp: float, annealed: bool,
                         like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        c = self.config
        steps = c.num_patches - 1
        g = torch.full((steps,), float(guidance), dtype=torch.float64)
        if annealed:
            g = g * torch.arange(1, steps + 1, dtype=torch.float64) / steps
        halves = [("a" in guide_what)] if c.nvp else []
        halves.append("b" in guide_what)
        mask = torch.tensor(halves, dtype=torch.float64).repeat_interleave(c.patch_dim)
        weights = (1.0 + g[:, None] * mask[None]).to(device=like.device, dtype=like.dtype)
        q_scale = None
        if attn_temp != 1.0:
            q_scale = torch.ones(2 * batch, 1, 1, 1, dtype=like.dtype, device=like.device)
            q_scale[batch:] = 1.0 / attn_temp
        return weights, q_scale

    def _allocate_kv_cache(self, rows: int, device: torch.device) -> torch.Tensor:
        """Keys and values of every layer of one block, reused by every block: (K, 2, rows, H, T-1, d).
        Kept in the autocast dtype when autocast is on (that is what the projections produce)."""
        c = self.config
        dtype = self.var.dtype
        if torch.is_autocast_enabled(device.type):
            dtype = torch.get_autocast_dtype(device.type)
        return torch.empty(c.layers_per_block, 2, rows, c.num_heads, c.num_patches - 1, c.head_dim,
                           dtype=dtype, device=device)

    # ---------------------------------------------------------------- safetensors export (Hugging Face layout)
    def save_pretrained(self, directory: str | os.PathLike, *, metadata: dict | None = None) -> Path:
        """Write ``directory/model.safetensors`` (this state dict) and then ``config.json`` (the architecture, and
        ``metadata`` under its "tarflow" key); returns the directory. See ``models.pretrained``."""
        from .pretrained import save_pretrained  # here, not at the top: models.pretrained imports this module

        return save_pretrained(self, directory, metadata=metadata)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> "TarFlow":
        """The model a ``save_pretrained`` directory holds, checked key by key, on ``map_location``, in eval mode."""
        from .pretrained import load_pretrained  # (see save_pretrained)

        return load_pretrained(directory, map_location)

    # ---------------------------------------------------------------- reference interoperability
    @classmethod
    def from_reference(cls, state_dict_or_path: Mapping[str, torch.Tensor] | str | os.PathLike,
                       config: TarFlowConfig) -> "TarFlow":
        """Build a model from a checkpoint of the official code (``transformer_flow.Model.state_dict()``)."""
        model = cls(config)
        model.load_reference_state_dict(state_dict_or_path)
        return model

    def load_reference_state_dict(self, state_dict_or_path: Mapping[str, torch.Tensor] | str | os.PathLike) -> None:
        if isinstance(state_dict_or_path, (str, os.PathLike)):
            state_dict, source = load_reference_file(state_dict_or_path), str(state_dict_or_path)
        else:
            state_dict, source = state_dict_or_path, "the reference state dict"
        state_dict = _strip_wrapper_prefixes(dict(state_dict))
        check_importable(self.config, state_dict, source)
        T = self.config.num_patches
        causal = torch.tril(torch.ones(T, T))
        for key in [k for k in state_dict if _ATTN_MASK_KEY.fullmatch(k)]:
            mask = state_dict.pop(key)
            if tuple(mask.shape) != (T, T) or not torch.equal(mask.float().cpu(), causal):
                raise ValueError(f"{key}: expected the causal (lower-triangular) mask of shape ({T}, {T}), "
                                 f"got shape {tuple(mask.shape)}; the checkpoint does not match {self.config}")
        check_state_dict_matches(self, state_dict)
        self.load_state_dict(state_dict, strict=True)

    def reference_state_dict(self) -> dict[str, torch.Tensor]:
        """A state dict the official code loads with ``strict=True`` (it adds each block's float ``attn_mask``) and
        computes this model from; refuses a model it would compute differently (see ``reference_config``)."""
        check_exportable(self.config)
        T = self.config.num_patches
        out: dict[str, torch.Tensor] = {}
        masked: set[str] = set()
        for key, value in self.state_dict().items():
            m = re.match(r"(blocks\.\d+)\.(.+)", key)
            # The reference registers attn_mask after the block's own parameters, before its sub-modules.
            if m and "." in m.group(2) and m.group(1) not in masked:
                out[f"{m.group(1)}.attn_mask"] = torch.tril(torch.ones(T, T, device=self.var.device))
                masked.add(m.group(1))
            out[key] = value
        return out


_ATTN_MASK_KEY = re.compile(r"blocks\.\d+\.attn_mask")


def _strip_wrapper_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept checkpoints saved from a DDP (``module.``) or compiled (``_orig_mod.``) wrapper."""
    for prefix in ("module.", "_orig_mod."):
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def check_state_dict_matches(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str = "checkpoint",
                             check_dtype: bool = False) -> None:
    """Raise a ValueError naming the first key whose presence or shape (and, with ``check_dtype``, dtype) differs
    from ``model``'s; ``source`` names what holds ``state_dict`` (a file, say) in the message.

    The dtype check is opt-in: ``load_state_dict`` casts, so torch-format checkpoints may hold another dtype, while a
    safetensors export promises the model's own tensors as they are."""
    expected = model.state_dict()
    config = getattr(model, "config", None)
    for key, tensor in expected.items():
        if key not in state_dict:
            raise ValueError(f"{source} is missing key {key!r} (expected shape {tuple(tensor.shape)}); "
                             f"does it match {config}?")
        got = state_dict[key]
        if tuple(got.shape) != tuple(tensor.shape):
            raise ValueError(f"{source} key {key!r} has shape {tuple(got.shape)} but the model expects "
                             f"{tuple(tensor.shape)} for {config}")
        if check_dtype and got.dtype != tensor.dtype:
            raise ValueError(f"{source} key {key!r} has dtype {got.dtype} but the model expects {tensor.dtype} "
                             f"for {config}")
    for key, tensor in state_dict.items():
        if key not in expected:
            raise ValueError(f"{source} has unexpected key {key!r} (shape {tuple(tensor.shape)}); "
                             f"does it match {config}?")


def num_parameters(model: nn.Module, exclude_embeddings: bool = False) -> int:
    """Parameter count; ``exclude_embeddings`` drops positional and class embeddings (scaling-law convention)."""
    return sum(p.numel() for name, p in model.named_parameters()
               if not (exclude_embeddings and name.rsplit(".", 1)[-1] in ("pos_embed", "class_embed")))


