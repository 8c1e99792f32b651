"""The model against the reference's golden tensors, its training step, and its handling of bad input."""

import threading

import pytest
import torch

from models import TarFlow, TarFlowConfig
from trainer.schedule import WarmupCosine

SAMPLING_CASES = {
    "reverse_g0": dict(),
    "reverse_g1.5": dict(guidance=1.5),
    "reverse_g1.5_annealed": dict(guidance=1.5, annealed_guidance=True),
    "reverse_g1.5_guide_a": dict(guidance=1.5, guide_what="a"),
    "reverse_g1.5_guide_b": dict(guidance=1.5, guide_what="b"),
    "reverse_g1.5_temp0.5": dict(guidance=1.5, attn_temp=0.5),
}


@pytest.fixture(scope="module")
def model(golden):
    return TarFlow.from_reference(golden["state_dict"], TarFlowConfig(**golden["config"]))


def assert_abs(actual, expected, atol):
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol)


def assert_rel(actual, expected, rel):
    err = (actual - expected).abs().max() / expected.abs().max()
    assert err <= rel, f"relative error {err:.3g} > {rel}"


def test_patchify_is_channel_major_and_unpatchify_inverts_it(model, golden):
    patches = model.patchify(golden["x"])
    assert torch.equal(patches, golden["x_patches"])
    assert torch.equal(model.unpatchify(patches), golden["x"])


def test_forward_loss_and_gradients_match_reference(model, golden):
    x = golden["x"].clone().requires_grad_(True)
    model.zero_grad()
    z, logdets, outputs = model(x, golden["y"], return_outputs=True)
    loss = model.loss(z, logdets)
    loss.backward()
    assert_abs(z, golden["z"], 1e-5)
    for ours, ref in zip(outputs, golden["outputs"], strict=True):
        assert_abs(ours, ref, 1e-5)
    assert_abs(logdets, golden["logdets"], 1e-5)
    assert_abs(loss, golden["loss"], 1e-5)
    assert_abs(model.per_sample_loss(z, logdets), golden["per_sample_loss"], 1e-5)
    assert_rel(x.grad, golden["grad_x"], 1e-4)
    params = dict(model.named_parameters())
    for name, ref in golden["grads"].items():
        assert_rel(params[name].grad, ref, 1e-4)
    model.zero_grad()


def test_no_labels_uses_the_mean_class_embedding(model, golden):
    with torch.no_grad():
        z, logdets = model(golden["x"])
        z_dropped, logdets_dropped = model(golden["x"], torch.full((4,), -1))
    assert_abs(z, golden["z_ynone"], 1e-5)
    assert_abs(logdets, golden["logdets_ynone"], 1e-5)
    assert torch.equal(z, z_dropped) and torch.equal(logdets, logdets_dropped)


@pytest.mark.parametrize("case", SAMPLING_CASES)
def test_sampling_matches_reference(model, golden, case):
    # The reference sampler reads label -1 as the last class; the switch reproduces it.
    out = model.reverse(golden["noise"], golden["y"], y_minus1_as_last_class=True, **SAMPLING_CASES[case])
    assert_abs(out, golden[case], 1e-4)
    explicit = model.reverse(golden["noise"], golden["y_minus1_as_last_class"], **SAMPLING_CASES[case])
    assert torch.equal(out, explicit)


def test_sampling_without_labels_and_sequence(model, golden):
    assert_abs(model.reverse(golden["noise"]), golden["reverse_ynone_g0"], 1e-4)
    seq = model.reverse(golden["noise"], golden["y"], y_minus1_as_last_class=True, return_sequence=True)
    assert len(seq) == len(golden["reverse_sequence_g0"]) == model.config.num_blocks + 1
    for ours, ref in zip(seq, golden["reverse_sequence_g0"]):
        assert_abs(ours, ref, 1e-4)


def test_label_minus_one_means_dropped_when_sampling(model, golden):
    noise, y = golden["noise"], golden["y"]
    dropped = model.reverse(noise, y)
    # Sample 2 has y = -1: it must equal the unconditional (mean-embedding) sample, not class 9's.
    assert torch.equal(dropped[2], model.reverse(noise)[2])
    assert not torch.allclose(dropped[2], golden["reverse_g0"][2])
    assert torch.equal(dropped[:2], model.reverse(noise, y, y_minus1_as_last_class=True)[:2])


def test_unconditional_model_matches_reference(golden):
    model = TarFlow.from_reference(golden["uncond_state_dict"], TarFlowConfig(**golden["uncond_config"]))
    with torch.no_grad():
        z, logdets = model(golden["x"])
    assert_abs(z, golden["uncond_z"], 1e-5)
    assert_abs(logdets, golden["uncond_logdets"], 1e-5)
    assert_abs(model.loss(z, logdets), golden["uncond_loss"], 1e-5)
    assert_abs(model.reverse(golden["noise"]), golden["uncond_reverse_g0"], 1e-4)
    # Attention-temperature guidance acts only through the unconditional branch, i.e. only with guidance > 0.
    assert_abs(model.reverse(golden["noise"], guidance=1.0, attn_temp=0.5), golden["uncond_reverse_t0.5_g1"], 1e-4)
    assert_abs(model.reverse(golden["noise"], attn_temp=0.5), golden["uncond_reverse_t0.5_g0"], 1e-4)


def test_volume_preserving_model_matches_reference(golden):
    model = TarFlow.from_reference(golden["vp_state_dict"], TarFlowConfig(**golden["vp_config"]))
    with torch.no_grad():
        z, logdets = model(golden["vp_x"])
    assert_abs(z, golden["vp_z"], 1e-5)
    assert torch.equal(logdets, golden["vp_logdets"])
    assert_abs(model.loss(z, logdets), golden["vp_loss"], 1e-5)
    assert_abs(model.reverse(golden["vp_noise"]), golden["vp_reverse_g0"], 1e-4)  # uses the random var
    model.update_prior(z.pow(2).mean(dim=0))
    assert_abs(model.var, golden["vp_var_after_update_prior"], 1e-6)


def test_denoise_matches_reference_and_is_batch_independent(model, golden):
    d = golden["denoise"]
    out = model.denoise(d["input"], d["y"], noise_std=d["noise_std"])
    assert_abs(out, d["output"], 1e-5)
    # The reference step size grows with the batch; ours is per sample.
    assert_abs(model.denoise(d["input"][:2], d["y"][:2], noise_std=d["noise_std"]), out[:2], 1e-6)
    with torch.inference_mode():
        assert_abs(model.denoise(d["input"], d["y"], noise_std=d["noise_std"]), out, 0)
    assert all(p.grad is None for p in model.parameters())


def test_three_adamw_steps_with_the_reference_schedule(golden):
    t = golden["train"]
    s = t["schedule"]
    model = TarFlow.from_reference(golden["state_dict"], TarFlowConfig(**golden["config"]))
    schedule = WarmupCosine(s["warmup_steps"], s["total_steps"], s["max_lr"], s["min_lr"], hold_floor=False)
    opt = torch.optim.AdamW(model.parameters(), lr=schedule.lr(0), betas=t["betas"], eps=t["eps"],
                            weight_decay=t["weight_decay"])
    for step, ref in enumerate(t["steps"]):
        assert schedule.lr(step) == pytest.approx(ref["lr_used"], rel=1e-9)
        assert schedule.lr(step + 1) == pytest.approx(ref["lr_after_sched_step"], rel=1e-9)
        for group in opt.param_groups:
            group["lr"] = schedule.lr(step)
        opt.zero_grad()
        loss = model.loss(*model(ref["x"], ref["y"]))
        loss.backward()
        opt.step()
        assert_abs(loss.detach(), ref["loss"], 1e-5)
    params = dict(model.named_parameters())
    assert_abs(params["blocks.0.proj_out.weight"], t["final_blocks.0.proj_out.weight"], 1e-5)
    assert_abs(params["blocks.3.class_embed"], t["final_blocks.3.class_embed"], 1e-5)
    sq_sum = sum(p.detach().double().pow(2).sum() for p in model.parameters())
    assert sq_sum.item() == pytest.approx(t["final_param_sq_sum"].item(), rel=1e-6)


# ---------------------------------------------------------------- sampler robustness

def test_sampling_leaves_no_state_after_an_exception(model, golden, monkeypatch):
    noise, y = golden["noise"], golden["y"]
    before = model.reverse(noise, y, guidance=1.5)
    layer = model.blocks[2].attn_blocks[1]
    calls = {"n": 0}
    original = type(layer).decode

    def failing_decode(self, *args):
        calls["n"] += 1
        if calls["n"] == 7:
            raise RuntimeError("interrupted mid-sampling")
        return original(self, *args)

    monkeypatch.setattr(type(layer), "decode", failing_decode)
    with pytest.raises(RuntimeError, match="interrupted"):
        model.reverse(noise, y, guidance=1.5)
    monkeypatch.undo()
    assert torch.equal(model.reverse(noise, y, guidance=1.5), before)
    with torch.no_grad():
        z, _ = model(golden["x"], golden["y"])
    assert_abs(z, golden["z"], 1e-5)


def test_two_samplings_can_interleave(model, golden):
    noise, y = golden["noise"], golden["y"]
    expected = {"a": model.reverse(noise, y, guidance=1.5), "b": model.reverse(noise.flip(0), None)}
    results = {}
    barrier = threading.Barrier(2)

    def run(name, *args, **kwargs):
        barrier.wait()
        for _ in range(3):
            results[name] = model.reverse(*args, **kwargs)

    threads = [threading.Thread(target=run, args=("a", noise, y), kwargs=dict(guidance=1.5)),
               threading.Thread(target=run, args=("b", noise.flip(0), None))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name in expected:
        assert torch.equal(results[name], expected[name])


def test_reverse_does_not_modify_the_noise(model, golden):
    noise = golden["noise"].clone()
    model.reverse(noise, golden["y"])
    assert torch.equal(noise, golden["noise"])


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("shape", [(2, 3, 16, 8), (2, 1, 16, 16), (3, 16, 16)])
def test_wrong_image_shape_is_rejected(model, shape):
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, 16, 16\)"):
        model(torch.zeros(shape))


def test_wrong_noise_shape_is_rejected(model):
    with pytest.raises(ValueError, match=r"expected latents in patch layout \(B, 16, 48\)"):
        model.reverse(torch.zeros(2, 3, 16, 16))


@pytest.mark.parametrize("labels, message", [
    ([0, 10], r"labels must lie in \[0, 10\) or be -1.*\[10\]"),
    ([-2, 3], r"got \[-2\]"),
    ([0, 1, 2], r"shape \(2,\)"),
])
def test_labels_out_of_range_are_rejected(model, labels, message):
    with pytest.raises(ValueError, match=message):
        model(torch.zeros(2, 3, 16, 16), torch.tensor(labels))
    with pytest.raises(ValueError, match=message):
        model.reverse(torch.zeros(2, 16, 48), torch.tensor(labels))


def test_labels_for_an_unconditional_model_are_rejected(golden):
    model = TarFlow(TarFlowConfig(**golden["uncond_config"]))
    with pytest.raises(ValueError, match="unconditional model"):
        model(torch.zeros(2, 3, 16, 16), torch.tensor([0, 1]))


def test_bad_guidance_arguments_are_rejected(model):
    with pytest.raises(ValueError, match="guide_what"):
        model.reverse(torch.zeros(1, 16, 48), guidance=1.0, guide_what="c")
    with pytest.raises(ValueError, match="attn_temp"):
        model.reverse(torch.zeros(1, 16, 48), guidance=1.0, attn_temp=0.0)


def test_sampling_and_denoising_under_bf16_autocast(model, golden):
    """The default precision on GPUs: cache, projections and guidance in bf16, the latent itself in float32."""
    noise, y = golden["noise"], golden["y"]
    for kwargs in (dict(), dict(guidance=1.5), dict(guidance=1.5, attn_temp=0.5, annealed_guidance=True)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.reverse(noise, y, **kwargs)
        assert out.dtype == torch.float32
        # bf16 matmuls (8-bit mantissa) compounded over 4 × 15 exp-affine steps: a few hundredths on values ~5.
        assert (out - model.reverse(noise, y, **kwargs)).abs().max() < 0.1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(model.denoise(out, y, noise_std=0.05)).all()
