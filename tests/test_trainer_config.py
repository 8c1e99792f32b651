import pytest

from trainer.config import Config, ConfigError, config_hash, from_yaml_text, load_config, to_yaml, validate
from trainer.strategies import STRATEGIES


def test_defaults_are_the_embedded_digits_run():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert (cfg.data.format, cfg.data.source) == ("embedded", "digits")
    assert (cfg.model.in_channels, cfg.model.img_size, cfg.model.num_classes) == (1, 8, 10)


def test_yaml_then_overrides_in_that_order(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  steps: 777\n  seed: 5\nmodel:\n  channels: 64\n")
    cfg = load_config(path, ["train.seed=9", "optim.betas=[0.8,0.9]"])
    assert (cfg.train.steps, cfg.train.seed, cfg.model.channels) == (777, 9, 64)
    assert cfg.optim.betas == [0.8, 0.9]


@pytest.mark.parametrize("overrides, message", [
    (["trian.steps=3"], "unknown config key 'trian'.*did you mean 'train'"),
    (["train.stepz=3"], "unknown config key 'train.stepz'.*did you mean 'train.steps'"),
    (["optim.weight_decya=0"], "did you mean 'optim.weight_decay'"),
    (["train.steps=abc"], "^train.steps: Value 'abc'"),
    (["model.channels=100"], "model.channels=100 is not a multiple of head_dim=32"),
    (["model.img_size=9"], "model.img_size=9 is not divisible by patch_size=2"),
    (["train.global_batch=100", "train.micro_batch=64"],
     "train.global_batch: 100 is not divisible by train.micro_batch × data-parallel size = 64 × 1"),
    (["train.noise=salt"], "train.noise: must be one of"),
    (["train.label_drop=1.5"], r"train.label_drop: must be in \[0, 1\)"),
    (["optim.lr=0"], "optim.lr: must be > 0"),
    (["schedule.warmup_steps=5000"], r"schedule.warmup_steps: must be in \[0, train.steps=1000\)"),
    (["train.strategy=magic"], "train.strategy: must be one of"),
    (["sample.method=newton"], r"sample.method: must be one of \('sequential', 'jacobi', 'gs-jacobi', 'auto'\)"),
    (["sample.method=jacobi", "sample.tol=-1"], "sample.tol: tol must be a number >= 0"),
    (["sample.max_iters=-2"], "sample.max_iters: must be >= 0"),
    (["train.resume_changes=sometimes"], r"train.resume_changes: must be one of \('refuse', 'allow'\), got 'so"),
    (["logging.wandb_mode=cloud"], r"logging.wandb_mode: must be offline, online, disabled or empty .*'cloud'"),
    (["logging.run_name=a/b"], "logging.run_name: names a run and its directory .*'a/b'"),
    (["model=3"], "'model' is a section"),
    (["steps"], "key=value"),
])
def test_bad_configs_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_unknown_key_in_a_yaml_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=rf"unknown config key 'optim.learning_rate' \(from {path}\)"):
        load_config(path)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("nope.yaml")


def test_batch_divisibility_depends_on_world_size():
    cfg = load_config(None, ["train.global_batch=128", "train.micro_batch=64"])
    validate(cfg, world_size=2)
    with pytest.raises(ConfigError, match="64 × 3 = 192"):
        validate(cfg, world_size=3)


def test_resolved_config_round_trips_and_hashes():
    cfg = load_config(None, ["train.steps=11", "schedule.warmup_steps=2"])
    assert from_yaml_text(to_yaml(cfg)) == cfg
    assert config_hash(cfg) == config_hash(from_yaml_text(to_yaml(cfg)))
    assert config_hash(cfg) != config_hash(load_config(None, ["train.steps=12", "schedule.warmup_steps=2"]))


def test_base_config_takes_further_overrides():
    base = load_config(None, ["train.steps=11", "schedule.warmup_steps=2"])
    cfg = load_config(None, ["data.heldout_fraction=0.2"], base=base)
    assert (cfg.train.steps, cfg.data.heldout_fraction) == (11, 0.2)


def test_config_accepts_exactly_the_registered_strategies():
    for name in STRATEGIES:
        assert load_config(None, [f"train.strategy={name}"]).train.strategy == name
    with pytest.raises(ConfigError, match=r"train.strategy: must be one of \('single', 'ddp', 'fsdp', 'deepspeed'\)"):
        load_config(None, ["train.strategy=zero"])


def test_shipped_configs_load():
    from pathlib import Path
    for path in sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")):
        load_config(path)


def test_logging_keys_of_wandb_and_tensorboard():
    cfg = load_config(None, ["logging.wandb_tags=[scaling,c16]", "logging.wandb_group=study",
                             "logging.tensorboard=true", "logging.run_name=c16-s0"])
    assert (cfg.logging.wandb_tags, cfg.logging.wandb_group, cfg.logging.tensorboard, cfg.logging.run_name) == (
        ["scaling", "c16"], "study", True, "c16-s0")
    assert (cfg.logging.wandb_mode, cfg.logging.wandb_project) == ("", "")  # empty: the WANDB_* environment
