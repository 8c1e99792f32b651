"""The sampler core and the FID sampling plan: noise and labels by global index across ranks, NaN redraws."""

import pytest
import torch

from models import TarFlow, TarFlowConfig
from tarflow_testing.evaluation import CPU, FP32, perturbed_model
from trainer.evaluation.fid import FIDError
from trainer.evaluation.inception import load_fid_network
from trainer.evaluation.sampler import (
    SamplingSettings,
    check_num_samples,
    draw,
    draw_noise,
    draw_samples,
    fixed_noise_and_labels,
    inversion_settings,
    noise_seed,
    rank_indices,
    sample_labels,
)
from trainer.evaluation.sweep import evaluate_setting

TINY = TarFlowConfig(in_channels=1, img_size=8, patch_size=2, channels=32, head_dim=16, num_blocks=2,
                     layers_per_block=1, num_classes=10)


# ---------------------------------------------------------------- the sampling plan
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_ranks_cover_exactly_the_requested_samples_with_distinct_seeds(world_size):
    n = 12
    slices = [rank_indices(n, r, world_size) for r in range(world_size)]
    assert sorted(i for s in slices for i in s) == list(range(n))
    assert len({len(s) for s in slices}) == 1
    seeds = [noise_seed(7, i, a) for i in range(n) for a in range(3)]
    assert len(set(seeds)) == len(seeds)  # redraws included: no two draws share a seed
    assert noise_seed(7, 3) != noise_seed(8, 3)


def test_a_count_not_divisible_by_the_ranks_is_a_clear_error():
    assert check_num_samples(12, 4) == 3
    with pytest.raises(ValueError, match="--num-samples 10 is not divisible by the 4 ranks.*e.g. 8 or 12"):
        check_num_samples(10, 4)
    with pytest.raises(ValueError, match="must be >= 1"):
        check_num_samples(0, 1)


def test_noise_and_labels_depend_only_on_the_global_index():
    model, _ = perturbed_model()
    c = model.config
    assert sample_labels(range(8, 13), 10).tolist() == [8, 9, 0, 1, 2]
    assert sample_labels(range(3), 0) is None
    s = SamplingSettings(guidance=1.5)
    one = list(draw_samples(model, range(12), s, base_seed=5, batch_size=5, device=CPU, precision=FP32))
    three = [b for r in range(3) for b in draw_samples(model, rank_indices(12, r, 3), s, base_seed=5,
                                                       batch_size=3, device=CPU, precision=FP32)]
    assert [i for b in one for i in b.indices] == [i for b in three for i in b.indices] == list(range(12))
    assert [d for b in one for d in b.draws] == [d for b in three for d in b.draws]
    torch.testing.assert_close(torch.cat([b.images for b in one]), torch.cat([b.images for b in three]),
                               rtol=1e-5, atol=1e-5)
    # sample 4 is model.reverse of its own noise and label
    expected = model.reverse(draw_noise(c, [noise_seed(5, 4)]), torch.tensor([4]), guidance=1.5)
    torch.testing.assert_close(one[0].images[4:5], expected, rtol=1e-5, atol=1e-5)


class Flaky(TarFlow):
    """NaN wherever the first noise value exceeds 0.5 (about 31% of draws)."""

    def reverse(self, noise, y=None, **kwargs):
        x = super().reverse(noise, y, **kwargs)
        bad = noise[:, 0, 0] > 0.5
        return torch.where(bad[:, None, None, None], torch.full_like(x, float("nan")), x)


def test_nan_samples_are_redrawn_with_fresh_noise_and_counted():
    model, cfg = perturbed_model()
    flaky = Flaky(cfg.model)
    flaky.load_state_dict(model.state_dict())
    c = flaky.config

    def first_good_attempt(i):
        a = 0
        while draw_noise(c, [noise_seed(3, i, a)])[0, 0, 0] > 0.5:
            a += 1
        return a

    attempts = [first_good_attempt(i) for i in range(12)]
    assert sum(attempts) > 0
    batches = list(draw_samples(flaky, range(12), SamplingSettings(), base_seed=3, batch_size=6, device=CPU,
                                precision=FP32))
    images = torch.cat([b.images for b in batches])
    assert torch.isfinite(images).all() and sum(b.redraws for b in batches) == sum(attempts)
    draws = [d for b in batches for d in b.draws]
    assert sorted((i, a) for i, a, _ in draws) == sorted((i, a) for i in range(12) for a in range(attempts[i] + 1))
    i = attempts.index(max(attempts))  # a redrawn sample is the model's sample of its last, good noise
    expected = model.reverse(draw_noise(c, [noise_seed(3, i, attempts[i])]), torch.tensor([i % 10]))
    torch.testing.assert_close(images[i:i + 1], expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(FIDError, match=r"still NaN/Inf after 0 redraws"):
        list(draw_samples(flaky, range(12), SamplingSettings(), base_seed=3, batch_size=6, device=CPU,
                          precision=FP32, max_redraws=0))
    # through the evaluation: the count is reported
    result = evaluate_setting(flaky, load_fid_network("tiny-random"), None, SamplingSettings(), num_samples=12,
                              base_seed=3, batch_size=6, device=CPU, precision=FP32)
    assert result.nan_redraws == sum(attempts) and result.num_samples == 12 and result.fid is None
    assert result.stats.n == 12  # the 12 finite samples reached the network, no NaN among them


def test_fixed_noise_depends_only_on_the_seed():
    model = TarFlow(TINY)
    a, _ = fixed_noise_and_labels(model, 5, seed=1)
    torch.manual_seed(123)
    b, _ = fixed_noise_and_labels(model, 5, seed=1)
    assert torch.equal(a, b)


def test_the_core_draws_a_trajectory_whose_last_state_is_the_sample_and_restores_the_mode():
    model, _ = perturbed_model()
    model.train()
    noise, labels = fixed_noise_and_labels(model, 4, seed=2)
    s = SamplingSettings(guidance=1.0, annealed=True, denoise_std=0.05)
    one = draw(model, noise, labels, s, device=CPU, precision=FP32)
    seq = draw(model, noise, labels, s, device=CPU, precision=FP32, sequence=True)
    assert model.training and len(one.states) == 1 and len(seq.states) == model.config.num_blocks + 1
    torch.testing.assert_close(seq.sample, one.sample, rtol=0, atol=0)
    torch.testing.assert_close(one.final, one.denoised, rtol=0, atol=0)
    assert draw(model, noise, labels, SamplingSettings(), device=CPU, precision=FP32).denoised is None


def test_the_core_passes_the_inversion_through_and_reports_passes_per_block():
    model = TarFlow(TINY).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    noise, labels = fixed_noise_and_labels(model, 4, seed=3)
    exact = draw(model, noise, labels, SamplingSettings(guidance=1.0), device=CPU, precision=FP32)
    assert exact.passes == [TINY.num_patches - 1] * TINY.num_blocks
    s = SamplingSettings(guidance=1.0, inversion=inversion_settings("gs-jacobi", 1e-3, module_size=4))
    assert s.name == "g1_t1_gs-jacobi0.001" and s.reverse_kwargs()["module_size"] == 4
    assert s.record() == {"guidance": 1.0, "attn_temp": 1.0, "annealed": False, "denoise_std": None,
                          "method": "gs-jacobi", "tol": 1e-3}
    parallel = draw(model, noise, labels, s, device=CPU, precision=FP32)
    assert len(parallel.passes) == TINY.num_blocks and all(1 <= p for p in parallel.passes)
    assert (parallel.sample - exact.sample).abs().max() < 1e-2
    with pytest.raises(ValueError, match="unknown method 'newton'"):
        inversion_settings("newton")
