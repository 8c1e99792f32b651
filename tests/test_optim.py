import pytest

from models import TarFlow, TarFlowConfig
from trainer.config import OptimConfig, load_config
from trainer.optim import build_optimizer, build_schedule, parameter_groups

TINY = TarFlowConfig(in_channels=1, img_size=8, patch_size=2, channels=32, head_dim=16, num_blocks=2,
                     layers_per_block=1, num_classes=3)


def test_reference_behaviour_decays_every_parameter():
    model = TarFlow(TINY)
    groups = parameter_groups(model, OptimConfig(weight_decay=0.1))
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.1
    assert len(groups[0]["params"]) == len(list(model.parameters()))


def test_exempting_norms_biases_and_embeddings():
    model = TarFlow(TINY)
    decayed, exempt = parameter_groups(model, OptimConfig(weight_decay=0.1, decay_norms_biases_embeddings=False))
    names = {id(p): n for n, p in model.named_parameters()}
    assert exempt["weight_decay"] == 0.0
    exempt_names = {names[id(p)] for p in exempt["params"]}
    decayed_names = {names[id(p)] for p in decayed["params"]}
    assert {"blocks.0.pos_embed", "blocks.0.class_embed", "blocks.0.proj_in.bias",
            "blocks.0.attn_blocks.0.attention.norm.weight"} <= exempt_names
    assert decayed_names == {n for n, p in model.named_parameters() if n.endswith(".weight") and p.dim() == 2}
    assert len(exempt_names) + len(decayed_names) == len(names)


def test_optimizer_uses_the_configured_betas_and_eps():
    opt = build_optimizer(TarFlow(TINY), OptimConfig(lr=0.01, betas=[0.8, 0.9], eps=1e-6))
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"]) == (0.01, (0.8, 0.9), 1e-6)


def test_schedule_spans_the_run_and_holds_its_floor():
    cfg = load_config(None, ["train.steps=100", "schedule.warmup_steps=10", "optim.lr=1e-3", "schedule.min_lr=1e-5"])
    schedule = build_schedule(cfg)
    lrs = [schedule.lr(step + 1) for step in range(100)]  # what the loop uses for step 0..99
    assert lrs[0] == pytest.approx(1e-5 + (1e-3 - 1e-5) / 10)  # the first step already learns
    assert lrs[9] == pytest.approx(1e-3)
    assert lrs[-1] == pytest.approx(1e-5)
    assert schedule.lr(150) == pytest.approx(1e-5)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
