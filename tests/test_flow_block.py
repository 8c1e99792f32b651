"""The mathematics of the flow: invertibility, exact log-determinants, causality, cached vs naive inversion."""

import pytest
import torch

from models import TarFlow, TarFlowConfig

TINY = dict(in_channels=1, img_size=4, patch_size=2, channels=16, head_dim=8, num_blocks=2, layers_per_block=2)


def perturbed(config: TarFlowConfig, seed: int = 0, dtype=torch.float64) -> TarFlow:
    """A model whose every parameter matters, perturbed as the golden model was (small enough that sampling,
    which compounds exp-affine updates, stays finite)."""
    torch.manual_seed(seed)
    model = TarFlow(config).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.01 if "proj_out" in name else 0.3 if name.endswith("_embed") else 0.05
            p.add_(torch.randn_like(p) * scale)
    return model


@pytest.mark.parametrize("nvp", [True, False])
def test_reverse_inverts_forward(nvp):
    model = perturbed(TarFlowConfig(**{**TINY, "nvp": nvp, "num_classes": 3}), dtype=torch.float32)
    x = torch.rand(5, 1, 4, 4) * 2 - 1
    y = torch.tensor([0, 2, -1, 1, 0])
    with torch.no_grad():
        z, _ = model(x, y)
    torch.testing.assert_close(model.reverse(z, y), x, rtol=0, atol=1e-5)


@pytest.mark.parametrize("nvp", [True, False])
def test_block_logdet_equals_autograd_jacobian(nvp):
    model = perturbed(TarFlowConfig(**{**TINY, "nvp": nvp}))
    x = torch.randn(1, 4, 4, dtype=torch.float64)  # (1, T, D) patch layout
    n = x.numel()
    for block in model.blocks:
        jac = torch.autograd.functional.jacobian(lambda v: block(v.view(1, 4, 4), None)[0].flatten(), x.flatten())
        _, logdet = block(x, None)
        sign, logabsdet = torch.linalg.slogdet(jac)
        assert sign != 0
        torch.testing.assert_close(logabsdet, n * logdet[0], rtol=0, atol=1e-10)
        x = block(x, None)[0].detach()


def test_each_block_is_causal_in_its_own_order():
    model = perturbed(TarFlowConfig(**TINY))
    x = torch.randn(4, 4, dtype=torch.float64)
    T, D = 4, 4
    for block in model.blocks:
        jac = torch.autograd.functional.jacobian(lambda v: block(v.view(1, T, D), None)[0].view(T, D), x)
        jac = jac.permute(0, 2, 1, 3)  # (token out, token in, D out, D in)
        order = list(range(T))[::-1] if block.flip else list(range(T))
        for i, t_out in enumerate(order):
            for j, t_in in enumerate(order):
                blk = jac[t_out, t_in]
                if j > i:  # a later token in the block's order never influences an earlier one
                    assert torch.count_nonzero(blk) == 0
                elif j == i:  # the diagonal is elementwise: z_t = (x_t - b) * exp(-a)
                    assert torch.count_nonzero(blk - torch.diag(torch.diagonal(blk))) == 0
        assert torch.count_nonzero(jac[order[1], order[0]]) > 0  # and it does depend on earlier tokens


def naive_reverse(model: TarFlow, noise, y, guidance=0.0, guide_what="ab", attn_temp=1.0, annealed=False):
    """Full-recompute inversion through the training path: no cache, two separate passes for guidance."""
    x = noise * model.var.sqrt()
    for block in reversed(model.blocks):
        x = block.permute(x).clone()
        T = x.shape[1]
        for i in range(T - 1):
            a, b = block.affine_params(x, block.class_condition(y))
            if guidance > 0:
                a_u, b_u = block.affine_params(x, block.class_condition(None), attn_temp)
                g = guidance * (i + 1) / (T - 1) if annealed else guidance
                if "a" in guide_what and a is not None:
                    a = a + g * (a - a_u)
                if "b" in guide_what:
                    b = b + g * (b - b_u)
            scale = 1.0 if a is None else torch.exp(a[:, i + 1])
            x[:, i + 1] = x[:, i + 1] * scale + b[:, i + 1]
        x = block.permute(x)
    return model.unpatchify(x)


@pytest.mark.parametrize("kwargs", [
    dict(), dict(guidance=2.0), dict(guidance=1.0, guide_what="a", attn_temp=0.7),
    dict(guidance=1.5, guide_what="b", annealed=True), dict(guidance=0.5, attn_temp=1.3, annealed=True),
])
@pytest.mark.parametrize("nvp", [True, False])
def test_kv_cached_sampling_equals_full_recompute(kwargs, nvp):
    config = TarFlowConfig(**{**TINY, "img_size": 8, "nvp": nvp, "num_classes": 4})
    model = perturbed(config)
    if not nvp:
        model.var.uniform_(0.5, 1.5)
    noise = torch.randn(3, config.num_patches, config.patch_dim, dtype=torch.float64)
    y = torch.tensor([1, -1, 3])
    with torch.no_grad():
        expected = naive_reverse(model, noise, y, **kwargs)
    annealed = kwargs.pop("annealed", False)
    got = model.reverse(noise, y, annealed_guidance=annealed, **kwargs)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
