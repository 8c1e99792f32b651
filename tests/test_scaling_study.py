"""scaling.spec / scaling.validate: the study spec (typed, errors naming the file and key); scaling.plan: the points
it expands to."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from models import TarFlow, num_parameters
from scaling.plan import budget_name, expand_sizes, plan_study
from scaling.spec import StudyError
from scaling.validate import load_study, study_from_dict
from trainer.api import parameter_counts
from trainer.config import load_config
from trainer.flops import flops_per_image

REPO = Path(__file__).resolve().parents[1]
DIGITS = str(REPO / "configs" / "digits.yaml")


def spec(**kw) -> dict:
    base = {"name": "t", "config": DIGITS, "sizes": {"channels": [16, 32], "head_dim": 16, "num_blocks": 2,
                                                     "layers_per_block": 1}}
    return {**base, **kw}


def test_a_grid_expands_to_every_combination_with_stable_names():
    s = study_from_dict(spec(sizes={"channels": [16, 32], "num_blocks": [2, 4], "layers_per_block": 1,
                                    "head_dim": 16}))
    sizes = expand_sizes(s)
    assert [z.name for z in sizes] == ["c16-b2-l1", "c16-b4-l1", "c32-b2-l1", "c32-b4-l1"]
    assert sizes[1].as_overrides() == ["model.channels=16", "model.num_blocks=4", "model.layers_per_block=1",
                                       "model.head_dim=16"]


def test_named_sizes_set_only_what_they_name_plus_their_own_overrides():
    s = study_from_dict(spec(sizes=[{"name": "small", "channels": 32},
                                    {"name": "wide", "channels": 64, "overrides": ["model.expansion=2"]}]))
    small, wide = expand_sizes(s)
    assert small.as_overrides() == ["model.channels=32"]
    assert wide.as_overrides() == ["model.channels=64", "model.expansion=2"]


def test_the_plan_converts_budgets_and_forces_the_measurement(tmp_path):
    s = study_from_dict(spec(overrides=["train.global_batch=64", "train.micro_batch=64", "train.noise=uniform"],
                             budgets=[{"steps": 30}, {"images": 6400}, {"flops": 3.0e11}], seeds=[0, 7],
                             warmup_fraction=0.1))
    points = plan_study(s, tmp_path)
    assert len(points) == 2 * 3 * 2
    by_name = {p.name: p for p in points}
    p = by_name["c32-b2-l1-images6400-s7"]
    assert p.steps == 100 and p.images == 6400 and p.global_batch == 64
    cfg = load_config(DIGITS, ["model.channels=32", "model.head_dim=16", "model.num_blocks=2",
                               "model.layers_per_block=1"])
    fpi = flops_per_image(cfg.model).train
    assert p.flops_per_image == fpi and p.train_flops == fpi * 6400
    f = by_name["c32-b2-l1-flops3e11-s0"]
    assert f.steps == round(3.0e11 / (fpi * 64))
    # the trainer's own config of the point: the budget, seed, warmup, measurement and resume settings, last
    cfg = load_config(f.argv[0], f.argv[1:])
    assert (cfg.train.steps, cfg.train.seed, cfg.schedule.warmup_steps) == (f.steps, 0, int(0.1 * f.steps))
    assert (cfg.train.noise, cfg.train.precision, cfg.eval.max_images, cfg.train.resume) == ("uniform", "fp32", 0,
                                                                                           "auto")
    assert cfg.train.run_dir == str(tmp_path / "points" / f.name)
    # smallest model first, then budget, then seed
    assert [q.params_total for q in points] == sorted(q.params_total for q in points)


def test_parameter_counts_leave_out_the_positional_and_class_embeddings():
    cfg = load_config(DIGITS, ["model.channels=48", "model.head_dim=16"])
    total, no_embed = parameter_counts(cfg.model)
    model = TarFlow(cfg.model)
    assert total == num_parameters(model) == sum(p.numel() for p in model.parameters())
    m = cfg.model
    assert total - no_embed == m.num_blocks * (m.num_patches + m.num_classes) * m.channels
    assert no_embed == num_parameters(model, exclude_embeddings=True)


def test_a_point_whose_config_is_invalid_carries_the_trainers_message(tmp_path):
    s = study_from_dict(spec(sizes=[{"name": "ok", "channels": 32, "head_dim": 16},
                                    {"name": "bad", "channels": 24, "head_dim": 16}]))
    points = {p.size: p for p in plan_study(s, tmp_path)}
    assert points["ok"].error == ""
    assert "bad" in points["bad"].error and "multiple of head_dim" in points["bad"].error


def test_a_study_file_loads_and_its_config_is_found_from_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    path = tmp_path / "s.yaml"
    path.write_text(textwrap.dedent("""
        name: from_file
        config: configs/digits.yaml
        sizes: {channels: [16, 32], head_dim: 16}
        budgets: {images: 1.0e+4}
        seeds: 3
    """))
    s = load_study(path)
    assert s.seeds == [3] and budget_name(s.budgets[0]) == "images10000"
    assert [p.name for p in plan_study(s, tmp_path / "d")] == ["c16-images10000-s3", "c32-images10000-s3"]


@pytest.mark.parametrize("change, message", [
    ({"sizes": {"chanels": [16]}},
     "unknown config key 'sizes.chanels' (from the study); did you mean 'sizes.channels'?"),
    ({"budget": [{"steps": 3}]}, "unknown config key 'budget' (from the study); did you mean 'budgets'?"),
    ({"run": {"were": "local"}}, "unknown config key 'run.were' (from the study); did you mean 'run.where'?"),
    ({"run": {"where": "cloud"}}, "run.where: must be one of local, slurm, k8s, got 'cloud'"),
    ({"run": {"where": "k8s"}}, "run.k8s.image: run.where=k8s needs a container image"),
    ({"budgets": [{"steps": 10, "images": 100}]}, "budgets[0]: give exactly one of steps, images or flops"),
    ({"budgets": [{"steps": 0}]}, "budgets[0].steps: must be > 0"),
    ({"budgets": [{"steps": 10}, {"steps": 10}]}, "budgets[1]: duplicate budget steps=10"),
    ({"budgets": [{"stepz": 10}]},
     "unknown config key 'budgets[0].stepz' (from the study); did you mean 'budgets[0].steps'?"),
    ({"sizes": {"channels": ["wide"]}}, "sizes.channels"),
    ({"sizes": []}, "sizes: the list of named sizes is empty"),
    ({"sizes": [{"channels": 16}]}, "sizes[0].name: every named size needs a name"),
    ({"sizes": [{"name": "a", "channels": 16}, {"name": "a", "channels": 32}]}, "duplicate size names: ['a']"),
    ({"sizes": 16}, "sizes must be a grid mapping or a list of named sizes"),
    ({"seeds": [0, 0]}, "seeds: has duplicates"),
    ({"name": "a b"}, "name: give the study a name"),
    ({"overrides": ["train.precision=bf16"]}, "train.precision=fp32"),
    ({"overrides": ["eval.max_images=50"]}, "eval.max_images=0"),
    ({"overrides": ["train.steps=5"]}, "train.steps is set per point by budgets:"),
    ({"overrides": ["train.run_dir=x"]}, "train.run_dir is set per point"),
    ({"overrides": ["lr"]}, "overrides[0]: must look like key=value"),
    ({"fit": {"x": "flops"}}, "fit.x: must be one of params_no_embed, params_total"),
    ({"config": "nope/missing.yaml"}, "config: nope/missing.yaml not found"),
    ({"fid": {"metric": "quality", "denoise": "sometimes"}},
     "fid.denoise: must be true, false or both, got 'sometimes'"),
    ({"fid": {"metric": "quality", "method": "newton"}},
     "fid.method: must be one of sequential, jacobi, gs-jacobi, auto, got 'newton'"),
    ({"fid": {"metric": "quality", "method": "jacobi", "tol": -1.0}}, "fid.tol: must be a number >= 0"),
])
def test_spec_errors_name_the_key(change, message, tmp_path):
    with pytest.raises(StudyError) as e:
        plan_study(study_from_dict(spec(**change), source="s.yaml"), tmp_path)
    assert message in str(e.value) and str(e.value).startswith("s.yaml: ")


def test_missing_sizes_and_bad_base_overrides_are_clear(tmp_path):
    with pytest.raises(StudyError, match="'sizes' is missing"):
        study_from_dict({"name": "t"})
    with pytest.raises(StudyError, match=r"the base config .* is invalid: unknown config key 'optim.lrr'"):
        plan_study(study_from_dict(spec(overrides=["optim.lrr=1"])), tmp_path)
    with pytest.raises(StudyError, match="does not exist"):
        load_study(tmp_path / "nope.yaml")


# ---------------------------------------------------------------- an axis of named sets
NOISE_SETS = [{"name": "uniform", "train.noise": "uniform"},
              {"name": "sigma0.05", "train.noise": "gaussian", "train.noise_std": 0.05}]


def test_an_axis_of_named_sets_moves_its_keys_together(tmp_path):
    s = study_from_dict(spec(sizes=[{"name": "c16", "channels": 16, "head_dim": 16}], grid={"noise": NOISE_SETS},
                             seeds=[0]))
    points = plan_study(s, tmp_path)
    assert sorted(p.name for p in points) == ["c16-steps1000-sigma0.05-s0", "c16-steps1000-uniform-s0"]
    by_set = {p.grid["noise"]: p for p in points}
    uniform = load_config(by_set["uniform"].argv[0], by_set["uniform"].argv[1:])
    gaussian = load_config(by_set["sigma0.05"].argv[0], by_set["sigma0.05"].argv[1:])
    assert (uniform.train.noise, gaussian.train.noise, gaussian.train.noise_std) == ("uniform", "gaussian", 0.05)
    # the study sets train.noise through the grid, so the driver adds no default noise of its own
    assert sum(a.startswith("train.noise=") for a in by_set["uniform"].argv) == 1
    # a named set is an axis like any other: crossed with a plain grid key
    s = study_from_dict(spec(sizes=[{"name": "c16", "channels": 16, "head_dim": 16}], seeds=[0],
                             grid={"noise": NOISE_SETS, "optim.lr": [1e-3, 2e-3]}))
    assert len(plan_study(s, tmp_path / "b")) == 4


@pytest.mark.parametrize("grid, message", [
    ({"noise": [{"train.noise": "uniform"}]}, "grid.noise[0].name: give each set a name"),
    ({"noise": [{"name": "a", "train.noise": "uniform"}, {"name": "a", "train.seed": 1}]},
     "grid.noise[1].name: 'a' names two sets"),
    ({"noise": [{"name": "a"}]}, "grid.noise[0] (a): give at least one config key"),
    ({"noise": [{"name": "a", "noise": "uniform"}]}, "grid.noise[0].noise: give the full config key"),
    ({"noise": [{"name": "a", "train.steps": 5}]}, "grid.noise.a.train.steps: train.steps is set per point"),
    ({"noise": [{"name": "a", "train.noise_sd": 0.1}]}, "grid.noise: 'a': unknown config key 'train.noise_sd'"),
    ({"noise": ["uniform"]}, "grid.noise: give the full config key (section.key), e.g. train.noise, or a list of "
                             "named sets"),
])
def test_named_set_errors_name_the_set_and_key(grid, message, tmp_path):
    with pytest.raises(StudyError) as e:
        plan_study(study_from_dict(spec(grid=grid), source="s.yaml"), tmp_path)
    assert message in str(e.value), str(e.value)


def test_points_are_grouped_by_study_where_runs_are_compared(tmp_path):
    points = plan_study(study_from_dict(spec(name="widths")), tmp_path)
    configs = [load_config(p.argv[0], p.argv[1:]) for p in points]
    assert {c.logging.wandb_group for c in configs} == {"widths"}
    assert [c.logging.run_name for c in configs] == [p.name for p in points]
    assert {c.logging.tensorboard_dir for c in configs} == {str(tmp_path / "tensorboard")}
    # the study's own overrides choose otherwise
    own = plan_study(study_from_dict(spec(name="widths", overrides=["logging.wandb_group=mine"])), tmp_path)
    assert load_config(own[0].argv[0], own[0].argv[1:]).logging.wandb_group == "mine"
