"""The memory plan against what is really there: the parameter layout against the model, the activation estimate
against the tensors a forward leaves alive, FLOPs against FlopCounterMode, and the per-rank training state of every
strategy against what 2 real gloo ranks hold (one torchrun launch)."""

import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from models import TarFlow, TarFlowConfig
from tarflow_testing.memory import forward_retained_bytes
from tarflow_testing.runs import REPO, torchrun
from trainer.activation_checkpointing import apply_activation_checkpointing
from trainer.config import load_config
from trainer.memory_plan import activation_bytes, checkpoint_bytes, parameter_shapes, plan_memory, step_flops
from trainer.strategies.deepspeed_config import build_deepspeed_config

MODELS = {
    "digits-like": TarFlowConfig(in_channels=1, img_size=8, patch_size=2, channels=32, head_dim=16, num_blocks=2,
                                 layers_per_block=2, num_classes=10),
    "volume-preserving, unconditional": TarFlowConfig(in_channels=3, img_size=8, patch_size=2, channels=32,
                                                      head_dim=16, num_blocks=3, layers_per_block=1, nvp=False),
}


@pytest.mark.parametrize("name", MODELS)
def test_parameter_layout_is_the_models(name):
    model = TarFlow(MODELS[name])
    assert [(s.name, s.shape) for s in parameter_shapes(MODELS[name])] == \
        [(n, tuple(p.shape)) for n, p in model.named_parameters()]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("every", [0, 1, 2])
@pytest.mark.parametrize("bf16", [False, True])
def test_activation_estimate_matches_the_tensors_a_forward_keeps(name, every, bf16):
    config = MODELS[name]
    torch.manual_seed(0)
    model = TarFlow(config)
    apply_activation_checkpointing(model, every)
    x = torch.rand(8, config.in_channels, config.img_size, config.img_size) * 2 - 1
    labels = [torch.randint(0, config.num_classes, (8,))] if config.num_classes else []
    measured = forward_retained_bytes(model, x, *labels, autocast_dtype=torch.bfloat16 if bf16 else None)
    plan = activation_bytes(config, 8, every, bf16)
    estimate = plan.with_checkpointing if every else plan.without_checkpointing
    print(f"{name}, checkpointing {every}, bf16 {bf16}: estimate {estimate} / measured {measured} = "
          f"{estimate / measured:.4f}")
    assert estimate == pytest.approx(measured, rel=0.05)


def test_checkpointing_every_layer_keeps_far_less():
    plan = activation_bytes(MODELS["digits-like"], 64, 1)
    assert plan.checkpointed_layers == 4 and plan.with_checkpointing < 0.2 * plan.without_checkpointing


def test_flops_per_step_and_the_recomputed_forward_match_flop_counter_mode():
    cfg = load_config(None, ["model.channels=32", "model.head_dim=16", "train.global_batch=16",
                             "train.micro_batch=16", "train.activation_checkpointing=2"])
    flops = step_flops(cfg, world_size=4)
    torch.manual_seed(0)
    model = TarFlow(cfg.model)
    layers = [layer for block in model.blocks for layer in block.attn_blocks][::2]
    h = torch.randn(16, cfg.model.num_patches - 1, cfg.model.channels)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:  # the math kernel is counted
        for layer in layers:
            layer(h)
        forward = model(torch.rand(16, 1, 8, 8), torch.zeros(16, dtype=torch.long))
    del forward
    layer_flops = sum(v for k, v in counter.get_flop_counts()["Global"].items())
    # FlopCounterMode counted the recomputed layers plus one forward of the whole model
    model_forward = flops.model // 3
    assert flops.recompute == layer_flops - model_forward
    assert flops.per_rank == (flops.model + flops.recompute) // 4


# ---------------------------------------------------------------- 2 real ranks
# 207,152 parameters with uneven shards: class_embed has 3 rows, of which FSDP gives rank 0 two.
BASE = ["model.in_channels=3", "model.channels=64", "model.head_dim=32", "model.num_blocks=2",
        "model.layers_per_block=2", "model.num_classes=3", "train.global_batch=16", "train.micro_batch=4"]
RUNS = {
    "single": [],
    "ddp": ["train.strategy=ddp", "train.ema.decay=0.99"],
    "fsdp": ["train.strategy=fsdp", "train.ema.decay=0.99"],
    "fsdp-block": ["train.strategy=fsdp", "fsdp.unit=block", "optim.decay_norms_biases_embeddings=false"],
    "zero1": ["train.strategy=deepspeed", "deepspeed.stage=1", "train.ema.decay=0.99"],
    "zero2": ["train.strategy=deepspeed", "deepspeed.stage=2", "optim.decay_norms_biases_embeddings=false",
              "train.ema.decay=0.99"],
    "zero3": ["train.strategy=deepspeed", "deepspeed.stage=3", "train.ema.decay=0.99"],
    # DeepSpeed's default bucket (2 GB) dwarfs this model's state: with a small one the state itself is compared
    "zero1-small-bucket": ["train.strategy=deepspeed", "deepspeed.stage=1"],
    "zero3-small-bucket": ["train.strategy=deepspeed", "deepspeed.stage=3", "train.activation_checkpointing=1"],
}
# 20,000 elements: more than the largest parameter (16,384), 80 KB; ZeRO-3 then gathers only the parameters with at
# most 1,000 elements for good
SMALL_BUCKET = {"zero_optimization": {"reduce_bucket_size": 20_000, "stage3_param_persistence_threshold": 1000}}


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    out = tmp_path_factory.mktemp("memory-plan")
    (out / "ds.json").write_text(json.dumps(SMALL_BUCKET))
    runs = {name: [*BASE, *extra] + ([f"deepspeed.config={out / 'ds.json'}"] if "small-bucket" in name else [])
            for name, extra in RUNS.items()}
    (out / "spec.json").write_text(json.dumps({"out": str(out), "runs": [{"name": n, "overrides": o}
                                                                         for n, o in runs.items()]}))
    torchrun([str(REPO / "tests" / "workers" / "memory_plan_ranks.py"), str(out / "spec.json")])
    return {name: (runs[name], json.loads((out / f"{name}.json").read_text())) for name in RUNS}


@pytest.mark.parametrize("name", RUNS)
def test_plan_matches_what_each_rank_holds(measured, name):
    overrides, result = measured[name]
    cfg = load_config(None, overrides, world_size=2)
    ds = build_deepspeed_config(cfg, 2, bf16=False) if cfg.train.strategy == "deepspeed" else None
    plan = plan_memory(cfg, 2, deepspeed_config=ds)
    ranks = result["ranks"]
    fullest = max(ranks, key=lambda r: sum(r.values()))
    held = sum(fullest.values())
    print(f"{name}: plan {plan.state.held_at_step:,} / measured {held:,} bytes = "
          f"{plan.state.held_at_step / held:.4f} (measured {fullest}); checkpoint plan {plan.checkpoint_bytes:,} / "
          f"written {result['checkpoint_bytes']:,} = {plan.checkpoint_bytes / result['checkpoint_bytes']:.3f}")
    assert plan.state.held_at_step == pytest.approx(held, rel=0.05)
    assert plan.state.parameters == pytest.approx(fullest["parameters"], rel=0.05)
    if cfg.train.strategy != "deepspeed":  # DeepSpeed's attribute names do not say what each buffer is
        assert plan.state.gradients == pytest.approx(fullest["gradients"], rel=0.05)
    assert plan.state.ema == pytest.approx(fullest["ema"], rel=0.05)  # 0 when the run keeps no average
    # The checkpoint's tensors, all ranks' files together; the formats add a record per tensor on top (about 0.4 KB in
    # a torch file, 1.6 KB per tensor and rank in DCP shards): a quarter of this small model's DCP files
    assert checkpoint_bytes(cfg, 2) <= result["checkpoint_bytes"] <= 1.5 * checkpoint_bytes(cfg, 2)
