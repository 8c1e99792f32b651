"""Parallel block inversion (Jacobi, GS-Jacobi) against the exact sequential sampler: exactness, the causality
bound, every guidance variant, tolerance, stats, bad arguments, and the chunked KV-cached transformer path."""

import pytest
import torch

from models import METHODS, BlockStats, InversionSettings, TarFlow, TarFlowConfig
from models.inversion_costs import CostModel
from models.transformer import TransformerLayer

TINY = dict(in_channels=1, img_size=8, patch_size=2, channels=16, head_dim=8, num_blocks=2, layers_per_block=2)
T = 16  # tokens of TINY


def perturbed(config: TarFlowConfig, seed: int = 0, dtype=torch.float64, out_scale: float = 0.05) -> TarFlow:
    """Every parameter matters; proj_out non-zero so that no block is the identity."""
    torch.manual_seed(seed)
    model = TarFlow(config).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = out_scale if "proj_out" in name else 0.3 if name.endswith("_embed") else 0.05
            p.add_(torch.randn_like(p) * scale)
    return model


@pytest.fixture(scope="module")
def golden_model(golden):
    return TarFlow.from_reference(golden["state_dict"], TarFlowConfig(**golden["config"]))


@pytest.fixture(scope="module")
def cond64():
    return perturbed(TarFlowConfig(**TINY, num_classes=4))


def tiny_noise(batch=3, dtype=torch.float64, seed=1):
    return torch.randn(batch, T, 4, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def max_err(a, b):
    return float((a - b).abs().max())


# ---------------------------------------------------------------- exactness

def test_decode_chunk_equals_the_training_path():
    torch.manual_seed(0)
    layer = TransformerLayer(16, 8, 2).double()
    h = torch.randn(3, 7, 16, dtype=torch.float64)
    kv = torch.empty(2, 3, 2, 7, 8, dtype=torch.float64)
    head = layer.decode_chunk(h[:, :3], kv, 0, None)
    tail = layer.decode_chunk(h[:, 3:], kv, 3, None)  # attends over the cached slots 0..2 and itself causally
    torch.testing.assert_close(torch.cat([head, tail], 1), layer(h), rtol=0, atol=1e-12)


@pytest.mark.parametrize("method, extra", [
    ("jacobi", dict(tol=0.0)), ("jacobi", dict(tol=0.0, max_iters=15)), ("jacobi", dict(tol=0.0, window=3)),
    ("gs-jacobi", dict(module_size=1)), ("gs-jacobi", dict(tol=0.0, module_size=4)),
    ("gs-jacobi", dict(tol=0.0, module_size=5, tough_blocks=[3], init="zeros")),
])
def test_exact_settings_equal_sequential_on_the_golden_model(golden_model, golden, method, extra):
    """fp32: the chunked kernel and the one-token kernel round differently: measured up to 1.9e-6 absolute on
    images up to ~5 (relative 4e-7); module size 1 runs the same one-token arithmetic and matches bit for bit."""
    noise, y = golden["noise"], golden["y"]
    for kwargs in (dict(), dict(guidance=1.5), dict(guidance=1.5, attn_temp=0.5, annealed_guidance=True)):
        expected = golden_model.reverse(noise, y, **kwargs)
        got = golden_model.reverse(noise, y, method=method, **extra, **kwargs)
        bound = 0 if extra.get("module_size") == 1 else 1e-6 * float(expected.abs().max())
        assert max_err(got, expected) <= bound


@pytest.mark.parametrize("kwargs", [
    dict(), dict(guidance=2.0), dict(guidance=1.0, guide_what="a", attn_temp=0.7),
    dict(guidance=1.5, guide_what="b", annealed_guidance=True), dict(guidance=0.5, attn_temp=1.3,
                                                                     annealed_guidance=True),
])
@pytest.mark.parametrize("nvp", [True, False])
def test_every_guidance_variant_equals_sequential_in_float64(kwargs, nvp):
    model = perturbed(TarFlowConfig(**TINY, nvp=nvp, num_classes=4))
    if not nvp:
        model.var.uniform_(0.5, 1.5)
    noise, y = tiny_noise(), torch.tensor([1, -1, 3])
    expected = model.reverse(noise, y, **kwargs)
    for method, extra in (("jacobi", dict(tol=0.0)), ("gs-jacobi", dict(tol=0.0, module_size=3)),
                          ("gs-jacobi", dict(module_size=1)), ("jacobi", dict(tol=0.0, window=4, init="zeros"))):
        got = model.reverse(noise, y, method=method, **extra, **kwargs)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kwargs", [dict(), dict(attn_temp=0.5), dict(guidance=1.0, attn_temp=0.5)])
def test_unconditional_model_and_attention_temperature(kwargs):
    model = perturbed(TarFlowConfig(**TINY))
    noise = tiny_noise()
    expected = model.reverse(noise, **kwargs)
    for method in ("jacobi", "gs-jacobi"):
        got = model.reverse(noise, method=method, tol=0.0, module_size=5, **kwargs)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_labels_none_minus_one_and_the_last_class_switch(cond64):
    noise = tiny_noise()
    y = torch.tensor([0, -1, 3])
    for kwargs in (dict(y=None), dict(y=y), dict(y=y, y_minus1_as_last_class=True)):
        expected = cond64.reverse(noise, guidance=1.0, **kwargs)
        got = cond64.reverse(noise, guidance=1.0, method="jacobi", tol=0.0, **kwargs)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    dropped = cond64.reverse(noise, y, method="jacobi", tol=0.0)
    torch.testing.assert_close(dropped[1], cond64.reverse(noise)[1], rtol=0, atol=1e-12)


def test_per_block_methods_and_return_sequence(cond64):
    noise, y = tiny_noise(), torch.tensor([1, 2, 0])
    expected = cond64.reverse(noise, y, guidance=1.0, return_sequence=True)
    stats = []
    got = cond64.reverse(noise, y, guidance=1.0, return_sequence=True, method=["jacobi", "sequential"],
                         tol=0.0, stats=stats)
    assert len(got) == len(expected) == 3
    for ours, ref in zip(got, expected):
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    # inversion order: the last block first
    assert [(s.block, s.method) for s in stats] == [(1, "sequential"), (0, "jacobi")]


def test_causality_bound_after_exactly_k_passes():
    """After k Jacobi passes tokens 0..k are the sequential recursion's (token 0 from the start, one more per
    pass), and token k+1 is generically not."""
    model = perturbed(TarFlowConfig(**{**TINY, "num_blocks": 1}), out_scale=0.2)  # block 0: no flip
    noise = tiny_noise()
    expected = model.patchify(model.reverse(noise))
    for k in (1, 2, 5, 9, 14):
        for init in ("zeros", "noise"):
            stats = []
            got = model.patchify(model.reverse(noise, method="jacobi", tol=0.0, max_iters=k, init=init, stats=stats))
            assert stats == [BlockStats(0, "jacobi", k, sum(range(T - k, T)), capped=True)]
            torch.testing.assert_close(got[:, : k + 1], expected[:, : k + 1], rtol=0, atol=1e-12)
            assert (got[:, k + 1] - expected[:, k + 1]).abs().max() > 1e-9


# ---------------------------------------------------------------- tolerance and cost

# Measured on the golden weights, max |Δ| of the images over tol, for tol in 1e-2, 1e-3, 1e-4 and no guidance,
# guidance 1.5, and guidance 1.5 with attn_temp 0.5 annealed: jacobi 0.095–0.210, jacobi window=4 0.079–0.153,
# gs-jacobi module_size=4 0.001–0.152. The test allows 1.0·tol (about 5× the worst measured).
TOL_BOUND = 1.0


@pytest.mark.parametrize("method, extra", [("jacobi", {}), ("jacobi", dict(window=4)),
                                           ("gs-jacobi", dict(module_size=4))])
def test_tolerance_bounds_the_error_on_the_golden_model(golden_model, golden, method, extra):
    noise, y = golden["noise"], golden["y"]
    for kwargs in (dict(), dict(guidance=1.5, attn_temp=0.5, annealed_guidance=True)):
        expected = golden_model.reverse(noise, y, **kwargs)
        for tol in (1e-2, 1e-3, 1e-4):
            stats = []
            got = golden_model.reverse(noise, y, method=method, tol=tol, stats=stats, **extra, **kwargs)
            assert max_err(got, expected) <= TOL_BOUND * tol
            assert all(not s.capped for s in stats)
            if method == "jacobi" and not extra:  # it converges well before T-1 = 15 passes
                assert all(s.passes <= 7 for s in stats)


def test_stats_of_every_method(cond64):
    noise = tiny_noise()
    for method in METHODS:
        stats = []
        cond64.reverse(noise, method=method, tol=1e-6, stats=stats)
        ran = {"auto": {"sequential", "jacobi", "jacobi+sequential"}}.get(method, {method})
        assert [s.block for s in stats] == [1, 0] and all(s.method in ran for s in stats)
        assert all(1 <= s.passes <= T - 1 and s.token_evals >= s.passes for s in stats)
    stats = []
    cond64.reverse(noise, method="gs-jacobi", module_size=1, stats=stats)
    assert all(s.passes == s.token_evals == T - 1 for s in stats)


def test_non_finite_rows_do_not_hold_back_the_others(cond64):
    noise = tiny_noise(4)
    clean_stats, bad_stats = [], []
    clean = cond64.reverse(noise[1:], method="jacobi", tol=1e-6, stats=clean_stats)
    bad_noise = noise.clone()
    bad_noise[0, 3] = float("nan")
    bad = cond64.reverse(bad_noise, method="jacobi", tol=1e-6, stats=bad_stats)
    assert not torch.isfinite(bad[0]).all()
    assert torch.isfinite(bad[1:]).all()
    assert [s.passes for s in bad_stats] == [s.passes for s in clean_stats] and max(s.passes for s in clean_stats) < 15
    torch.testing.assert_close(bad[1:], clean, rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", ["jacobi", "gs-jacobi"])
def test_an_overflowing_guess_does_not_reach_the_tokens_before_it(method):
    """A latent of 1e30 at token 10: the sequential result is finite up to token 10 and non-finite after it (the
    LayerNorm of such a token overflows). A Jacobi guess holds it from the first pass; unbounded, it would reach
    tokens 1..9 through the attention's masked positions (0 · inf = NaN) and the row would be lost, so the guesses
    are bounded: tokens 0..10 equal the sequential ones, exactly as the causality bound says."""
    model = perturbed(TarFlowConfig(**{**TINY, "num_blocks": 1}, num_classes=4), dtype=torch.float32)
    noise = tiny_noise(2, dtype=torch.float32)
    noise[0, 10] = 1e30
    expected = model.patchify(model.reverse(noise, guidance=1.0))
    got = model.patchify(model.reverse(noise, guidance=1.0, method=method, tol=0.0, module_size=4))
    assert torch.isfinite(expected[0, :11]).all() and not torch.isfinite(expected[0, 11:]).all()
    torch.testing.assert_close(got[0, :11], expected[0, :11], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-5)


def test_bf16_autocast_runs_and_is_close(golden_model, golden):
    noise, y = golden["noise"], golden["y"]
    kwargs = dict(guidance=1.5, attn_temp=0.5, annealed_guidance=True)
    expected = golden_model.reverse(noise, y, **kwargs)
    for method in ("jacobi", "gs-jacobi"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = golden_model.reverse(noise, y, method=method, module_size=4, **kwargs)
        assert got.dtype == torch.float32
        # as the sequential sampler's bf16 test: a few hundredths on values ~5 (measured 0.044 and 0.047)
        assert max_err(got, expected) < 0.1


# ---------------------------------------------------------------- auto
SIZES = (1, 2, 4, 8, 15)


@pytest.mark.parametrize("kwargs", [dict(), dict(guidance=1.5, attn_temp=0.5, annealed_guidance=True)])
def test_auto_with_measured_costs_is_exact_at_tol_zero(golden_model, golden, kwargs):
    """Whatever the timings choose on this machine: tol=0 gives the sequential result (up to kernel rounding)."""
    noise, y = golden["noise"], golden["y"]
    expected = golden_model.reverse(noise, y, **kwargs)
    got = golden_model.reverse(noise, y, method="auto", tol=0.0, **kwargs)
    assert max_err(got, expected) <= 1e-6 * float(expected.abs().max())


def test_auto_decodes_sequentially_where_a_pass_costs_as_much_as_its_tokens(cond64):
    """Compute-bound (a pass over n tokens costs n steps): no window pays, so every block is the exact sequential
    sampler, bit for bit."""
    compute_bound = CostModel(step=1.0, sizes=SIZES, chunk=tuple(float(n) for n in SIZES))
    assert compute_bound.break_even_passes == 1 and not compute_bound.worth_iterating
    noise, stats = tiny_noise(), []
    got = cond64.reverse(noise, guidance=1.0, method="auto", costs=compute_bound, stats=stats)
    assert torch.equal(got, cond64.reverse(noise, guidance=1.0))
    assert [(s.method, s.passes) for s in stats] == [("sequential", T - 1)] * 2


def test_auto_hands_a_slow_block_to_the_sequential_sampler_and_stays_exact(cond64):
    """A pass costs 3 steps (break-even at 5 passes): Jacobi may keep going only while it finishes tokens about as
    fast as decoding them would (plus the probe's margin of one sequential block). tol=0 finishes about one token
    per pass, so the guard hands over mid-block; the result is still the sequential one."""
    slow_passes = CostModel(step=1.0, sizes=SIZES, chunk=(3.0,) * len(SIZES))
    assert slow_passes.break_even_passes == 5 and slow_passes.worth_iterating
    noise, stats = tiny_noise(), []
    got = cond64.reverse(noise, guidance=1.0, method="auto", tol=0.0, costs=slow_passes, stats=stats)
    torch.testing.assert_close(got, cond64.reverse(noise, guidance=1.0), rtol=0, atol=1e-12)
    assert {s.method for s in stats} == {"jacobi+sequential"}
    # it remembers: the next batch of this shape goes to the sequential sampler straight away, bit for bit
    stats = []
    again = cond64.reverse(noise, guidance=1.0, method="auto", tol=0.0, costs=slow_passes, stats=stats)
    assert torch.equal(again, cond64.reverse(noise, guidance=1.0))
    assert [(s.method, s.passes) for s in stats] == [("sequential", T - 1)] * 2
    # where passes are cheap, the same blocks run as Jacobi to the end
    free_passes = CostModel(step=1.0, sizes=SIZES, chunk=(0.01,) * len(SIZES))
    stats = []
    cond64.reverse(noise, guidance=1.0, method="auto", tol=0.0, costs=free_passes, stats=stats)
    assert {s.method for s in stats} == {"jacobi"}


# ---------------------------------------------------------------- bad arguments

@pytest.mark.parametrize("kwargs, message", [
    (dict(method="newton"), r"unknown method 'newton'; choose one of 'sequential', 'jacobi', 'gs-jacobi'"),
    (dict(method=["jacobi", "newton"]), r"unknown method 'newton'"),
    (dict(method="auto", costs=(1.0, 2.0)), r"costs must be a models.inversion_costs.CostModel or None"),
    (dict(method=["jacobi"] * 3), r"method has 3 entries but the model has 2 blocks"),
    (dict(method="jacobi", tol=-1e-3), r"tol must be a number >= 0"),
    (dict(method="jacobi", max_iters=0), r"max_iters must be a positive integer or None, got 0"),
    (dict(method="jacobi", window=0), r"window must be a positive integer"),
    (dict(method="gs-jacobi", module_size=0), r"module_size must be a positive integer"),
    (dict(method="gs-jacobi", tough_blocks=[2]), r"tough_blocks \[2\] name blocks beyond the model's 2"),
    (dict(method="jacobi", init="ones"), r"unknown init 'ones'; choose one of 'noise', 'zeros'"),
])
def test_bad_arguments_are_rejected(cond64, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cond64.reverse(tiny_noise(1), **kwargs)


def test_settings_validate_on_their_own():
    with pytest.raises(ValueError, match="tol"):
        InversionSettings(method="jacobi", tol=float("nan"))
    with pytest.raises(ValueError, match="tough_blocks must be a collection of block indices"):
        InversionSettings(method="gs-jacobi", tough_blocks=3)
    with pytest.raises(ValueError, match=r"tough_blocks must be block indices >= 0, got \[-1\]"):
        InversionSettings(method="gs-jacobi", tough_blocks=[-1])
    assert InversionSettings(method=["jacobi", "sequential"]).method == ("jacobi", "sequential")
