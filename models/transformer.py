"""Pre-norm causal transformer layer of a TarFlow block, with a training path and KV-cached decode paths
(one token per call for the sequential sampler, a chunk of tokens for the parallel ones).

Module and parameter names match the reference implementation (``attention.qkv``, ``mlp.main.0`` ...), so that
reference state dicts load by name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _layer_norm_fp32(norm: nn.LayerNorm, h: torch.Tensor) -> torch.Tensor:
    # The reference evaluates LayerNorm in float32 even under bf16 autocast, and casts back. The parameters are
    # cast too, so that bf16 parameters (FSDP mixed precision) and float64 models work.
    x = at_least_fp32(h)
    return F.layer_norm(x, norm.normalized_shape, norm.weight.to(x.dtype), norm.bias.to(x.dtype),
                        norm.eps).to(h.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with a fused q|k|v projection (q, k, v are contiguous thirds, heads 64-blocks)."""

    def __init__(self, channels: int, head_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        self.head_dim = head_dim
        self.num_heads = channels // head_dim

    def forward(self, h: torch.Tensor, attn_temp: float = 1.0) -> torch.Tensor:
        """Causal attention over a whole sequence ``h`` (B, T, C); query t sees keys 0..t."""
        B, T, C = h.shape
        qkv = self.qkv(_layer_norm_fp32(self.norm, h))
        q, k, v = qkv.view(B, T, 3 * self.num_heads, self.head_dim).transpose(1, 2).chunk(3, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.head_dim ** -0.5 / attn_temp)
        return self.proj(out.transpose(1, 2).reshape(B, T, C))

    def decode(self, h: torch.Tensor, kv: torch.Tensor, pos: int, q_scale: torch.Tensor | None) -> torch.Tensor:
        """One token per row: ``h`` (R, C) is token ``pos``; its k, v are written into ``kv`` (2, R, H, L, d)
        in place and the query attends over slots ``0..pos``. ``q_scale`` (R, 1, 1, 1) divides rows' logits by
        their attention temperature."""
        R, C = h.shape
        qkv = self.qkv(_layer_norm_fp32(self.norm, h)).view(R, 3, self.num_heads, self.head_dim)
        kv[:, :, :, pos] = qkv[:, 1:].transpose(0, 1)
        q = qkv[:, 0].unsqueeze(2)
        if q_scale is not None:
            q = q * q_scale
        out = F.scaled_dot_product_attention(q, kv[0, :, :, : pos + 1], kv[1, :, :, : pos + 1],
                                             scale=self.head_dim ** -0.5)
        return self.proj(out.view(R, C))

    def decode_chunk(self, h: torch.Tensor, kv: torch.Tensor, start: int,
                     q_scale: torch.Tensor | None) -> torch.Tensor:
        """``n`` tokens per row: ``h`` (R, n, C) holds positions ``start..start+n-1``; their k, v are written into
        ``kv`` (2, R, H, L, d) slots ``start..start+n-1`` in place, and query ``start+i`` attends over slots
        ``0..start+i`` (slots before ``start`` must already hold earlier tokens). ``q_scale`` as in ``decode``."""
        R, n, C = h.shape
        end = start + n
        qkv = self.qkv(_layer_norm_fp32(self.norm, h)).view(R, n, 3, self.num_heads, self.head_dim)
        kv[:, :, :, start:end] = qkv[:, :, 1:].permute(2, 0, 3, 1, 4)
        q = qkv[:, :, 0].transpose(1, 2)  # (R, H, n, d)
        if q_scale is not None:
            q = q * q_scale
        # An explicit mask: SDPA's is_causal aligns the triangle top-left when queries and keys differ in length,
        # which would hide from query i the keys start..start+i it must see. Additive (-inf above the diagonal)
        # rather than boolean: the CPU kernel takes half the time with it (141 vs 70 us at 2x55 queries, 64 keys).
        mask = torch.full((n, end), float("-inf"), dtype=q.dtype, device=h.device).triu(diagonal=start + 1)
        out = F.scaled_dot_product_attention(q, kv[0, :, :, :end], kv[1, :, :, :end], attn_mask=mask,
                                             scale=self.head_dim ** -0.5)
        return self.proj(out.transpose(1, 2).reshape(R, n, C))


class MLP(nn.Module):
    def __init__(self, channels: int, expansion: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.main = nn.Sequential(
            nn.Linear(channels, channels * expansion),
            nn.GELU(),  # exact erf form, as the reference
            nn.Linear(channels * expansion, channels),
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.main(_layer_norm_fp32(self.norm, h))


class TransformerLayer(nn.Module):
    """``h + Attention(h)`` then ``h + MLP(h)``; each sub-layer normalises its own input (pre-norm)."""

    def __init__(self, channels: int, head_dim: int, expansion: int):
        super().__init__()
        self.attention = Attention(channels, head_dim)
        self.mlp = MLP(channels, expansion)

    def forward(self, h: torch.Tensor, attn_temp: float = 1.0) -> torch.Tensor:
        h = h + self.attention(h, attn_temp)
        return h + self.mlp(h)

    def decode(self, h: torch.Tensor, kv: torch.Tensor, pos: int, q_scale: torch.Tensor | None) -> torch.Tensor:
        h = h + self.attention.decode(h, kv, pos, q_scale)
        return h + self.mlp(h)

    def decode_chunk(self, h: torch.Tensor, kv: torch.Tensor, start: int,
                     q_scale: torch.Tensor | None) -> torch.Tensor:
        """``decode`` for ``n`` consecutive tokens per row at once: ``h`` (R, n, C) at positions start..start+n-1."""
        h = h + self.attention.decode_chunk(h, kv, start, q_scale)
        return h + self.mlp(h)
