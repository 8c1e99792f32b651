"""One TarFlow flow block: an autoregressive affine flow over a token sequence, parameterised by a causal
transformer (the reference's ``MetaBlock``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .transformer import TransformerLayer, at_least_fp32


class FlowBlock(nn.Module):
    """Maps x (B, T, D) to z with ``z_t = (x_t - b_t) * exp(-a_t)`` where (a_t, b_t) are predicted from tokens
    ``< t`` in this block's order. Odd blocks (``flip=True``) process tokens in reverse order; a token keeps the
    positional embedding of its original position. Token 0 (in block order) passes through unchanged."""

    def __init__(self, patch_dim: int, channels: int, num_patches: int, num_layers: int, head_dim: int,
                 expansion: int, nvp: bool, num_classes: int, flip: bool):
        super().__init__()
        # Registration order follows the reference so that the same seed gives the same initial parameters.
        self.proj_in = nn.Linear(patch_dim, channels)
        self.pos_embed = nn.Parameter(torch.randn(num_patches, channels) * 1e-2)
        if num_classes:
            self.class_embed = nn.Parameter(torch.randn(num_classes, 1, channels) * 1e-2)
        else:
            self.class_embed = None
        self.attn_blocks = nn.ModuleList(
            [TransformerLayer(channels, head_dim, expansion) for _ in range(num_layers)])
        self.nvp = nvp
        self.proj_out = nn.Linear(channels, 2 * patch_dim if nvp else patch_dim)
        self.proj_out.weight.data.zero_()
        self.flip = flip
        self.patch_dim = patch_dim

    # ---------------------------------------------------------------- helpers
    def permute(self, x: torch.Tensor) -> torch.Tensor:
        """Block order <-> original order along the token axis (an involution)."""
        return x.flip(-2) if self.flip else x

    def class_condition(self, y: torch.Tensor | None) -> torch.Tensor | None:
        """Additive class term: (B, 1, C) for labels (−1 = dropped = mean embedding), (1, C) for ``y=None``,
        ``None`` for an unconditional block."""
        if self.class_embed is None:
            return None
        mean = self.class_embed.mean(dim=0)
        if y is None:
            return mean
        return torch.where((y < 0).view(-1, 1, 1), mean, self.class_embed[y.clamp(min=0)])

    def _split(self, o: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """First half of ``proj_out`` is the log-scale a, second half the shift b; volume-preserving: a = 0."""
        if self.nvp:
            return o[..., : self.patch_dim], o[..., self.patch_dim:]
        return None, o

    # ---------------------------------------------------------------- training direction
    def affine_params(self, x: torch.Tensor, cond: torch.Tensor | None,
                      attn_temp: float = 1.0) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(a, b) for every token of ``x`` (B, T, D) given in block order; token 0 gets a = b = 0."""
        # Causality makes the output at the last token unused (it would parameterise token T): skip it.
        h = self.proj_in(x[:, :-1]) + self.permute(self.pos_embed)[:-1]
        if cond is not None:
            h = h + cond
        for layer in self.attn_blocks:
            h = layer(h, attn_temp)
        o = F.pad(self.proj_out(h), (0, 0, 1, 0))  # shift by one token: token t is predicted from tokens < t
        return self._split(o)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, D) in original order, labels y → (z in original order, per-dimension log|det| (B,), float32).

        The class term is computed here, inside the block's own forward, so that a wrapper which gathers the
        block's parameters for its forward (FSDP) has them in place."""
        x = self.permute(x)
        a, b = self.affine_params(x, self.class_condition(y))
        if a is None:
            return self.permute(x - b), x.new_zeros(x.shape[0], dtype=torch.promote_types(x.dtype, torch.float32))
        z = (x - b) * torch.exp(-at_least_fp32(a)).to(a.dtype)
        # Per-dimension mean (token 0's zero row included), kept in float32 even under bf16 autocast.
        return self.permute(z), -at_least_fp32(a).mean(dim=(1, 2))

    # ---------------------------------------------------------------- sampling direction
    def decode_bias(self, y: torch.Tensor | None, guided: bool) -> torch.Tensor:
        """Positional plus class term added to ``proj_in`` of each decoded token, shaped (G, B|1, T-1, C):
        one slice for the conditional rows and, with guidance, one for the unconditional (mean class) rows."""
        pos = self.permute(self.pos_embed)[:-1]
        conds = [self.class_condition(y)] + ([self.class_condition(None)] if guided else [])
        terms = [pos if c is None else pos + c for c in conds]
        terms = [t if t.dim() == 3 else t.unsqueeze(0) for t in terms]
        return torch.stack(torch.broadcast_tensors(*terms))

    def reverse(self, z: torch.Tensor, rows_bias: torch.Tensor, kv_cache: torch.Tensor,
                guidance_weights: torch.Tensor | None, q_scale: torch.Tensor | None) -> torch.Tensor:
        """Invert the block autoregressively with a preallocated KV cache; returns a new tensor.

        ``rows_bias`` (G, B|1, T, C): positional + class term per branch (G = 2 with guidance: conditional rows
        then unconditional rows, run as one batch). ``kv_cache`` (K, 2, G*B, H, >=T-1, d) is scratch space that
        this call overwrites. ``guidance_weights`` (T-1, 2D or D): per-step 1 + g, for θ + g(θ − θ_uncond),
        with g = 0 for the halves not guided. ``q_scale``: per-row attention temperature for the decode path.
        """
        x = self.permute(z).clone()
        self.decode_from(x, 0, rows_bias, kv_cache, guidance_weights, q_scale)
        return self.permute(x)

    def decode_from(self, x: torch.Tensor, start: int, rows_bias: torch.Tensor, kv_cache: torch.Tensor,
                    guidance_weights: torch.Tensor | None, q_scale: torch.Tensor | None) -> None:
        """In place, in block order: tokens ``start+1..T-1`` of ``x`` one at a time from the tokens before them.
        Cache slots ``< start`` must hold tokens ``< start`` (a parallel inverter hands over mid-block this way)."""
        B, T, _ = x.shape
        G = rows_bias.shape[0]
        for i in range(start, T - 1):
            h = (self.proj_in(x[:, i]) + rows_bias[:, :, i]).view(G * B, -1)
            for layer_idx, layer in enumerate(self.attn_blocks):
                h = layer.decode(h, kv_cache[layer_idx], i, q_scale)
            o = self.proj_out(h)
            if guidance_weights is not None:
                if guidance_weights.dtype != o.dtype:  # bf16 under autocast: cast the table once, not every step
                    guidance_weights = guidance_weights.to(o.dtype)
                # lerp(u, c, 1 + w) = c + w·(c − u), evaluated by torch as c − (c − u)·(−w): one kernel.
                o = torch.lerp(o[B:], o[:B], guidance_weights[i])
            a, b = self._split(o)
            if a is None:
                x[:, i + 1] += b
            else:
                torch.addcmul(b, x[:, i + 1], torch.exp(at_least_fp32(a)).to(a.dtype), out=x[:, i + 1])
