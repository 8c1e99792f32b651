"""Training-step throughput (zero_grad + forward + loss + backward + AdamW), ours against the reference's forward.

The baseline (in this file) is the reference's forward over the same modules: attention with an explicit T×T
boolean mask and a transformer output computed for every token, including the last one, which the shift then
discards. Both give the same loss (checked before timing). Prints images/s and the ratio ours / baseline.

    .venv/bin/python bench/train_step.py [--threads 2] [--repeats 5] [--cases A,B]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.sample import CASES, trained_like  # noqa: E402
from bench.timing import cpu_benchmark_args, interleaved_best  # noqa: E402
from models import TarFlow  # noqa: E402


def _baseline_attention(attn, h, mask):
    B, T, C = h.shape
    x = attn.norm(h.float()).type(h.dtype)
    q, k, v = attn.qkv(x).reshape(B, T, 3 * attn.num_heads, attn.head_dim).transpose(1, 2).chunk(3, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.head_dim ** -0.5)
    return attn.proj(out.transpose(1, 2).reshape(B, T, C))


def baseline_forward(model: TarFlow, x: torch.Tensor, y: torch.Tensor):
    T = model.config.num_patches
    mask = torch.tril(torch.ones(T, T)).bool()  # the reference converts its float buffer every call
    z = model.patchify(x)
    logdets = torch.zeros(())
    for block in model.blocks:
        xp = block.permute(z)
        h = block.proj_in(xp) + block.permute(block.pos_embed)
        h = h + block.class_condition(y)
        for layer in block.attn_blocks:
            h = h + _baseline_attention(layer.attention, h, mask)
            h = h + layer.mlp.main(layer.mlp.norm(h.float()).type(h.dtype))
        o = block.proj_out(h)
        o = torch.cat([torch.zeros_like(o[:, :1]), o[:, :-1]], dim=1)
        a, b = o.chunk(2, dim=-1)
        z = block.permute((xp - b) * torch.exp(-a.float()).type(a.dtype))
        logdets = logdets - a.mean(dim=(1, 2))
    return z, logdets


def main() -> None:
    args = cpu_benchmark_args(__doc__, repeats=5)
    print(f"{'case':<6}{'batch':>6}{'baseline img/s':>16}{'ours img/s':>12}{'ratio':>8}")
    for name in args.cases.split(","):
        config, batch = CASES[name]
        model = trained_like(config).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.95), weight_decay=1e-4)
        gen = torch.Generator().manual_seed(0)
        x = torch.rand(batch, config.in_channels, config.img_size, config.img_size, generator=gen) * 2 - 1
        y = torch.randint(0, config.num_classes, (batch,), generator=gen)
        with torch.no_grad():
            torch.testing.assert_close(model.loss(*model(x, y)), model.loss(*baseline_forward(model, x, y)),
                                       rtol=1e-5, atol=1e-5)

        def step(forward):
            opt.zero_grad(set_to_none=True)
            model.loss(*forward(x, y)).backward()
            opt.step()

        t_base, t_ours = interleaved_best(
            [lambda: step(lambda a, b: baseline_forward(model, a, b)), lambda: step(model)], args.repeats)
        print(f"{name:<6}{batch:>6}{batch / t_base:>16.2f}{batch / t_ours:>12.2f}{t_base / t_ours:>8.2f}",
              flush=True)


if __name__ == "__main__":
    main()
