"""The DeepSpeed config dict is ours: batch, accumulation, clipping and precision from our sections; an expert JSON
adds settings and may not contradict ours. Misconfigurations fail before any process group exists."""

import json
import sys

import pytest
import torch

from cluster.env import ProcessEnv
from trainer.config import ConfigError, load_config
from trainer.loop import train
from trainer.strategies.deepspeed_config import build_deepspeed_config

BASE = ["train.strategy=deepspeed", "train.global_batch=64", "train.micro_batch=8", "optim.grad_clip=0.5",
        "deepspeed.stage=3"]


def config(tmp_path, expert=None, extra=()):
    overrides = [*BASE, *extra, f"train.run_dir={tmp_path / 'run'}"]
    if expert is not None:
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(expert))
        overrides.append(f"deepspeed.config={path}")
    return load_config(None, overrides)


def test_our_sections_define_batch_accumulation_clipping_stage_and_precision(tmp_path):
    ds = build_deepspeed_config(config(tmp_path), world_size=2, bf16=True)
    assert ds["train_batch_size"] == 64 and ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == 4  # 64 / (8 × 2)
    assert ds["gradient_clipping"] == 0.5 and ds["zero_optimization"] == {"stage": 3}
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["communication_data_type"] == "fp32" and ds["data_types"]["grad_accum_dtype"] == "fp32"
    assert "optimizer" not in ds and "scheduler" not in ds  # ours: AdamW and the schedule


def test_expert_settings_merge_and_agreeing_values_are_accepted(tmp_path):
    expert = {"zero_optimization": {"stage": 3, "overlap_comm": True, "reduce_bucket_size": 5e7},
              "train_batch_size": 64, "bf16": {"enabled": "true"}, "activation_checkpointing": {"profile": False}}
    ds = build_deepspeed_config(config(tmp_path, expert), world_size=2, bf16=True)
    assert ds["zero_optimization"] == {"stage": 3, "overlap_comm": True, "reduce_bucket_size": 5e7}
    assert ds["activation_checkpointing"] == {"profile": False} and ds["train_batch_size"] == 64


@pytest.mark.parametrize("expert, message", [
    ({"train_batch_size": 128}, r"'train_batch_size'=128, which contradicts train.global_batch \(= 64\)"),
    ({"zero_optimization": {"stage": 2}}, r"'zero_optimization.stage'=2, which contradicts deepspeed.stage \(= 3\)"),
    ({"gradient_clipping": 1.0}, r"'gradient_clipping'=1.0, which contradicts optim.grad_clip \(= 0.5\)"),
    ({"fp16": {"enabled": True}}, r"'fp16.enabled'=True, which contradicts train.precision \(fp16 is not"),
    ({"bf16": {"enabled": True}}, r"'bf16.enabled'=True, which contradicts train.precision \(= False\)"),
    ({"optimizer": {"type": "Adam"}}, r"sets 'optimizer', but the optimizer is AdamW built from the optim section"),
    ({"scheduler": {"type": "WarmupLR"}}, r"sets 'scheduler', but the learning rate comes from the schedule"),
])
def test_an_expert_json_contradicting_our_config_is_an_error_naming_both(tmp_path, expert, message):
    with pytest.raises(ConfigError, match=message):
        build_deepspeed_config(config(tmp_path, expert), world_size=2, bf16=False)


def test_missing_or_malformed_expert_json(tmp_path):
    cfg = config(tmp_path, extra=[f"deepspeed.config={tmp_path / 'nope.json'}"])
    with pytest.raises(ConfigError, match="nope.json does not exist"):
        build_deepspeed_config(cfg, world_size=1, bf16=False)
    (tmp_path / "bad.json").write_text("{stage: 3")
    cfg = config(tmp_path, extra=[f"deepspeed.config={tmp_path / 'bad.json'}"])
    with pytest.raises(ConfigError, match="bad.json is not valid JSON"):
        build_deepspeed_config(cfg, world_size=1, bf16=False)


def test_stage_is_checked():
    with pytest.raises(ConfigError, match="deepspeed.stage: must be 1, 2 or 3, got 4"):
        load_config(None, ["deepspeed.stage=4"])


TWO = ProcessEnv(rank=0, world_size=2, local_world_size=2, scheduler="torchrun")


def test_misconfigurations_fail_before_any_process_group(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="contradicts train.global_batch"):
        train(config(tmp_path, {"train_batch_size": 32}), env=TWO)
    with pytest.raises(ConfigError, match=r"64 is not divisible by train.micro_batch × data-parallel size = 8 × 3"):
        train(config(tmp_path), env=ProcessEnv(rank=0, world_size=3, local_world_size=3, scheduler="torchrun"))
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # as on a machine without deepspeed: import fails
    with pytest.raises(ImportError, match=r"train.strategy=deepspeed needs the deepspeed package .*pip install"):
        train(config(tmp_path), env=TWO)
    assert not torch.distributed.is_initialized()
