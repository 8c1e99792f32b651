"""Sampling throughput: our sampler against the reference's design, measured in one run.

The baseline (in this file) is the reference's algorithm over the same modules: a Python-list KV cache
re-concatenated at every step, the guided and unguided branches as two separate passes. Both samplers produce the
same images (checked before timing). Prints images/s and the ratio ours / baseline.

    .venv/bin/python bench/sample.py [--threads 2] [--repeats 3] [--cases A,B]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.timing import cpu_benchmark_args, interleaved_best  # noqa: E402
from models import TarFlow, TarFlowConfig  # noqa: E402

CASES = {
    # name: (config, batch)
    "A": (TarFlowConfig(in_channels=3, img_size=32, patch_size=4, channels=128, num_blocks=4, layers_per_block=2,
                        num_classes=10), 32),
    "B": (TarFlowConfig(in_channels=3, img_size=32, patch_size=2, channels=256, num_blocks=4, layers_per_block=4,
                        num_classes=10), 16),
}


# ---------------------------------------------------------------- the reference's sampler design
def _baseline_attention(attn, x, cache, temp):
    B, T, C = x.shape
    x = attn.norm(x.float()).type(x.dtype)
    q, k, v = attn.qkv(x).reshape(B, T, 3 * attn.num_heads, attn.head_dim).transpose(1, 2).chunk(3, dim=1)
    cache[0].append(k)
    cache[1].append(v)
    k = torch.cat(cache[0], dim=2)
    v = torch.cat(cache[1], dim=2)
    x = F.scaled_dot_product_attention(q, k, v, scale=attn.head_dim ** -0.5 / temp)
    return attn.proj(x.transpose(1, 2).reshape(B, T, C))


def _baseline_step(block, x_i, pos_i, y, caches, temp):
    h = block.proj_in(x_i) + pos_i
    if block.class_embed is not None:
        h = h + (block.class_embed[y] if y is not None else block.class_embed.mean(dim=0))
    for layer, cache in zip(block.attn_blocks, caches):
        h = h + _baseline_attention(layer.attention, h, cache, temp)
        h = h + layer.mlp.main(layer.mlp.norm(h.float()).type(h.dtype))
    return block.proj_out(h).chunk(2, dim=-1)


@torch.no_grad()
def baseline_reverse(model: TarFlow, noise, y=None, guidance=0.0, attn_temp=1.0):
    x = noise * model.var.sqrt()
    for block in reversed(model.blocks):
        x = block.permute(x).clone()
        pos = block.permute(block.pos_embed)
        cond = [[[], []] for _ in block.attn_blocks]
        uncond = [[[], []] for _ in block.attn_blocks]
        for i in range(x.shape[1] - 1):
            a, b = _baseline_step(block, x[:, i:i + 1], pos[i:i + 1], y, cond, 1.0)
            if guidance > 0:
                a_u, b_u = _baseline_step(block, x[:, i:i + 1], pos[i:i + 1], None, uncond, attn_temp)
                a = a + guidance * (a - a_u)
                b = b + guidance * (b - b_u)
            x[:, i + 1] = x[:, i + 1] * torch.exp(a[:, 0].float()).type(a.dtype) + b[:, 0]
        x = block.permute(x)
    return model.unpatchify(x)


def trained_like(config: TarFlowConfig) -> TarFlow:
    """Random but non-trivial weights with finite samples (proj_out is zero at init, which would hide work)."""
    torch.manual_seed(0)
    model = TarFlow(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.002 if "proj_out" in name else 0.02))
    return model


def main() -> None:
    args = cpu_benchmark_args(__doc__, repeats=3, guidance=2.0)
    print(f"{'case':<6}{'batch':>6}{'guidance':>10}{'baseline img/s':>16}{'ours img/s':>12}{'ratio':>8}")
    for name in args.cases.split(","):
        config, batch = CASES[name]
        model = trained_like(config)
        noise = torch.randn(batch, config.num_patches, config.patch_dim, generator=torch.Generator().manual_seed(1))
        y = torch.arange(batch) % config.num_classes
        for guidance in (0.0, args.guidance):
            ours = model.reverse(noise, y, guidance=guidance)
            ref = baseline_reverse(model, noise, y, guidance=guidance)
            assert torch.isfinite(ours).all()
            torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
            t_base, t_ours = interleaved_best(
                [lambda: baseline_reverse(model, noise, y, guidance=guidance),
                 lambda: model.reverse(noise, y, guidance=guidance)], args.repeats)
            print(f"{name:<6}{batch:>6}{guidance:>10.1f}{batch / t_base:>16.2f}{batch / t_ours:>12.2f}"
                  f"{t_base / t_ours:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
