"""``configs/paper/``: the paper's runs (shared/TARFLOW.md §11) as configs that load, validate at their launch size,
count their steps in the official epochs, load the official AFHQ checkpoint's layout, and dry-run at 8 and 64 ranks
from a machine that reaches neither their data nor their bucket, planning memory without building the model."""

import re

import pytest
import torch

from cluster.env import ProcessEnv
from models import TarFlow
from models.reference_config import check_importable
from tarflow.main import main
from tarflow_testing.runs import REPO
from trainer.config import load_config
from trainer.dry_run import dry_run

PAPER = REPO / "configs" / "paper"
IMAGENET_TRAIN, AFHQ_TRAIN = 1_281_167, 14_630  # training images (TARFLOW.md §11 runs; AFHQ: StarGAN v2's split)

# file: (GPUs of the paper's launch, training images, epochs, global batch, P-Ch-T-K, classes, noise, σ, label drop)
RUNS = {
    "imagenet64_uncond.yaml": (8, IMAGENET_TRAIN, 200, 256, (2, 768, 8, 8), 0, "gaussian", 0.05, 0.0),
    "imagenet64_uncond_bpd.yaml": (16, IMAGENET_TRAIN, 100, 256, (2, 768, 8, 8), 0, "uniform", None, 0.0),
    "imagenet64_cond.yaml": (8, IMAGENET_TRAIN, 200, 256, (2, 768, 8, 8), 1000, "gaussian", 0.05, 0.1),
    "imagenet128_cond.yaml": (32, IMAGENET_TRAIN, 320, 768, (4, 1024, 8, 8), 1000, "gaussian", 0.15, 0.1),
    "afhq256_cond.yaml": (8, AFHQ_TRAIN, 4000, 256, (8, 768, 8, 8), 3, "gaussian", 0.07, 0.1),
}


def test_every_paper_config_is_listed_here():
    assert sorted(p.name for p in PAPER.glob("*.yaml")) == sorted(RUNS)


@pytest.mark.parametrize("name", sorted(RUNS))
def test_a_paper_config_is_the_official_run_at_its_launch_size(name):
    gpus, images, epochs, batch, (p, ch, blocks, layers), classes, noise, std, drop = RUNS[name]
    cfg = load_config(PAPER / name, world_size=gpus)  # validates: the global batch splits over these ranks
    m, t, o = cfg.model, cfg.train, cfg.optim
    assert (m.patch_size, m.channels, m.num_blocks, m.layers_per_block) == (p, ch, blocks, layers)
    assert (m.head_dim, m.expansion, m.nvp, m.num_classes) == (64, 4, True, classes)
    epoch = images // batch  # the official loader's len() (drop_last) on every paper launch
    assert t.global_batch == batch and cfg.schedule.warmup_steps == epoch and t.steps == epochs * epoch
    assert (o.lr, list(o.betas), o.weight_decay, o.grad_clip, cfg.schedule.min_lr) == (1e-4, [0.9, 0.95], 1e-4, 0,
                                                                                         1e-6)
    assert o.decay_norms_biases_embeddings and t.label_drop == drop and t.noise == noise
    assert t.precision == ("fp32" if noise == "uniform" else "bf16")
    if std is not None:
        assert t.noise_std == std
    for world in (8, 64):  # the same file plans both launches
        load_config(PAPER / name, world_size=world)


def _official_afhq_shapes() -> dict[str, tuple[int, ...]]:
    """The state dict of transformer_flow.Model(3, 256, 8, 768, 8, 8, nvp=True, num_classes=3), by TARFLOW.md §3's
    table (written out here, not taken from our model)."""
    T, D, C, K, classes = (256 // 8) ** 2, 3 * 8 * 8, 768, 8, 3
    shapes = {"var": (T, D)}
    for i in range(8):
        b = f"blocks.{i}."
        shapes.update({b + "pos_embed": (T, C), b + "class_embed": (classes, 1, C), b + "attn_mask": (T, T),
                       b + "proj_in.weight": (C, D), b + "proj_in.bias": (C,),
                       b + "proj_out.weight": (2 * D, C), b + "proj_out.bias": (2 * D,)})
        for j in range(K):
            a = f"{b}attn_blocks.{j}."
            for norm in ("attention.norm", "mlp.norm"):
                shapes.update({f"{a}{norm}.weight": (C,), f"{a}{norm}.bias": (C,)})
            shapes.update({a + "attention.qkv.weight": (3 * C, C), a + "attention.qkv.bias": (3 * C,),
                           a + "attention.proj.weight": (C, C), a + "attention.proj.bias": (C,),
                           a + "mlp.main.0.weight": (4 * C, C), a + "mlp.main.0.bias": (4 * C,),
                           a + "mlp.main.2.weight": (C, 4 * C), a + "mlp.main.2.bias": (C,)})
    return shapes


def test_the_afhq_model_has_the_public_checkpoints_layout():
    cfg = load_config(PAPER / "afhq256_cond.yaml", world_size=8)
    with torch.device("meta"):  # shapes only: no 1.9 GB of weights
        model = TarFlow(cfg.model)
        exported = model.reference_state_dict()
    official = _official_afhq_shapes()
    assert {k: tuple(v.shape) for k, v in exported.items()} == official
    # what `tarflow ckpt import-reference` checks first: every size the file's shapes imply agrees with the config
    check_importable(cfg.model, {k: torch.empty(s, device="meta") for k, s in official.items()},
                     "afhq_model_8_768_8_8_0.07.pth")
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(463.5e6, abs=0.05e6)  # TARFLOW.md §3


@pytest.fixture
def no_model(monkeypatch):
    """A dry run plans from the config: building the model (its real weights) fails the test."""
    def refuse(self, *args, **kwargs):
        raise AssertionError("the dry run built a TarFlow")

    monkeypatch.setattr(TarFlow, "__init__", refuse)


@pytest.mark.parametrize("name", sorted(RUNS))
def test_a_paper_config_dry_runs_at_8_and_64_ranks_without_its_data_or_bucket(name, tmp_path, monkeypatch, capsys,
                                                                              s3_server, no_model):
    monkeypatch.chdir(tmp_path)
    # what a laptop has: no shards under data.uri and no bucket for the checkpoints
    where = [f"data.uri={tmp_path / 'no-shards'}", "checkpoint.uri=s3://no-such-bucket-tarflow/run"]
    for launch in (["--world-size", "8"], ["--world-size", "64", "--nodes", "8"]):
        assert main(["train", str(PAPER / name), *where, "--dry-run", *launch, "--all-strategies"]) == 2
        out, err = capsys.readouterr()
        ranks = launch[1]
        assert f"ok  config: valid for {ranks} rank(s), train.strategy=fsdp" in out
        assert "FAIL data: cannot read the dataset manifest" in out and "FAIL checkpoints:" in out
        assert "resume: not decided" in out
        assert f"memory plan: fsdp (layer units) on {ranks} rank(s)" in out
        assert re.search(r"training state +[\d.,]+ [MG]iB", out) and "peak per rank, roughly:" in out
        for row in ("ddp", "* fsdp (layer units)", "deepspeed ZeRO-1", "deepspeed ZeRO-2", "deepspeed ZeRO-3"):
            assert re.search(rf"^\s*{re.escape(row)}( +[\d.,]+| +-){{7}}$", out, re.M), row
        assert err.count("\n") == 1 and "dry run: 2 check(s) failed" in err and "no-such-bucket-tarflow" in err
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("name", ["imagenet64_cond.yaml", "imagenet128_cond.yaml"])
def test_fsdp_shards_the_training_state_eight_times_finer_at_64_ranks(name, tmp_path, monkeypatch, no_model):
    monkeypatch.chdir(tmp_path)
    overrides = [f"data.uri={tmp_path / 'no-shards'}", f"checkpoint.uri={tmp_path / 'ckpt'}"]
    state = {}
    for world, nodes in ((8, 1), (64, 8)):
        cfg = load_config(PAPER / name, overrides, world_size=world)
        report = dry_run(cfg, ProcessEnv(world_size=world, local_world_size=world // nodes, scheduler="torchrun"))
        assert [p.split(":")[0] for p in report.problems] == ["data"]
        state[world] = report.plan.state
    # every parameter is split by rows, rank 0 holding ceil(rows / ranks): 1/8 of the bytes, up to that rounding
    for part in ("parameters", "gradients", "optimizer_moments"):
        assert getattr(state[64], part) * 8 == pytest.approx(getattr(state[8], part), rel=2e-3), part
    assert state[64].parameters * 8 >= state[8].parameters
