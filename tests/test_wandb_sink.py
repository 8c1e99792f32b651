"""W&B: which run (config, then WANDB_* environment, then defaults), offline runs, images, never failing training."""

import json
import sys
import types

import numpy as np
import pytest

from trainer.config import LoggingConfig
from trainer.metric_sinks import JsonlSink, MetricLogger
from trainer.wandb_sink import RUN_ID_FILE, WandbOptions, WandbSink, resolve_wandb_options

ENVIRONMENT = {"WANDB_PROJECT": "env-project", "WANDB_MODE": "online", "WANDB_ENTITY": "env-team",
               "WANDB_RUN_GROUP": "env-group", "WANDB_TAGS": "x, y,", "WANDB_NAME": "env-name",
               "WANDB_DIR": "/env/dir"}


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------- which run
def test_without_config_or_environment_the_defaults(tmp_path):
    assert resolve_wandb_options(LoggingConfig(), tmp_path / "digits", environ={}) == WandbOptions(
        project="tarflow", mode="offline", name="digits", directory=str(tmp_path / "digits"), entity=None,
        group=None, tags=())


def test_empty_config_values_take_the_environment(tmp_path):
    assert resolve_wandb_options(LoggingConfig(), tmp_path / "digits", environ=ENVIRONMENT) == WandbOptions(
        project="env-project", mode="online", name="env-name", directory="/env/dir", entity="env-team",
        group="env-group", tags=("x", "y"))


def test_config_values_are_explicit_and_win_over_the_environment(tmp_path):
    cfg = LoggingConfig(wandb_project="p", wandb_mode="offline", wandb_entity="team", wandb_group="study",
                        wandb_tags=["a", "b"], run_name="point-1")
    o = resolve_wandb_options(cfg, tmp_path / "digits", environ=ENVIRONMENT)
    assert (o.project, o.mode, o.entity, o.group, o.tags, o.name) == ("p", "offline", "team", "study", ("a", "b"),
                                                                      "point-1")


def test_wandb_mode_disabled_in_the_environment_always_wins(tmp_path):
    o = resolve_wandb_options(LoggingConfig(wandb_mode="online"), tmp_path, environ={"WANDB_MODE": "Disabled"})
    assert o.mode == "disabled"


# ---------------------------------------------------------------- a real offline run
def test_an_offline_run_carries_group_tags_and_name_and_resumes_with_its_id(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for variable in ENVIRONMENT:
        monkeypatch.delenv(variable, raising=False)
    run_dir = tmp_path / "run"
    cfg = LoggingConfig(wandb_group="digits_sizes", wandb_tags=["scaling", "c16"], run_name="c16-steps10-s0")
    sink = WandbSink(resolve_wandb_options(cfg, run_dir), run_dir, {"channels": 32})
    assert sink.enabled
    assert (sink.run.group, tuple(sink.run.tags), sink.run.name, sink.run.project) == (
        "digits_sizes", ("scaling", "c16"), "c16-steps10-s0", "tarflow")
    assert sink.init_kwargs["mode"] == "offline" and sink.init_kwargs["dir"] == str(run_dir)
    sink.log(1, {"loss": 2.0})
    sink.log_images(1, {"samples/g0": np.zeros((16, 16, 3), np.uint8)})
    assert sink.enabled  # both calls were accepted
    sink.close()
    run_id = (run_dir / RUN_ID_FILE).read_text().strip()
    offline_runs = list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline_runs) == 1

    resumed = WandbSink(resolve_wandb_options(LoggingConfig(), run_dir), run_dir, {"channels": 32})
    assert resumed.enabled and resumed.run_id == run_id and resumed.run.id == run_id
    resumed.log(1, {"loss": 0.9})  # a step logged again after resuming from an earlier checkpoint
    resumed.close()


# ---------------------------------------------------------------- a stand-in wandb module
class _Run:
    def __init__(self):
        self.logged = []

    def define_metric(self, *args, **kwargs):
        pass

    def log(self, data):
        self.logged.append(data)

    def finish(self):
        pass


def _fake_wandb(monkeypatch, init):
    fake = types.ModuleType("wandb")
    fake.init = init
    fake.Settings = lambda **kwargs: kwargs
    fake.Image = lambda array, caption=None: ("Image", array.shape, caption)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    return fake


def _options(tmp_path):
    return resolve_wandb_options(LoggingConfig(), tmp_path / "run", environ={})


def test_sample_grids_are_logged_as_wandb_images_under_the_step_metric(tmp_path, monkeypatch):
    run = _Run()
    _fake_wandb(monkeypatch, lambda **kwargs: run)
    sink = WandbSink(_options(tmp_path), tmp_path / "run", {})
    sink.log_images(40, {"samples/g1": np.zeros((8, 12, 3), np.uint8)})
    assert run.logged == [{"step": 40, "samples/g1": ("Image", (8, 12, 3), "samples/g1 at step 40")}]


def test_wandb_run_id_in_the_environment_is_taken_and_kept(tmp_path, monkeypatch):
    seen = []
    _fake_wandb(monkeypatch, lambda **kwargs: seen.append(kwargs["id"]) or _Run())
    WandbSink(_options(tmp_path), tmp_path / "run", {}, environ={"WANDB_RUN_ID": "chosen1"})
    WandbSink(_options(tmp_path), tmp_path / "run", {}, environ={})  # resumed without the variable
    assert seen == ["chosen1", "chosen1"]
    assert (tmp_path / "run" / RUN_ID_FILE).read_text().strip() == "chosen1"


# ---------------------------------------------------------------- never failing training
def test_init_failure_disables_the_sink_and_logging_continues(tmp_path, monkeypatch, capsys):
    def init(**kwargs):
        raise TimeoutError("wandb unreachable")

    _fake_wandb(monkeypatch, init)
    path = tmp_path / "m.jsonl"
    sink = WandbSink(_options(tmp_path), tmp_path / "run", {})
    assert not sink.enabled
    logger = MetricLogger([sink, JsonlSink(path)])
    logger.log(1, {"loss": 1.0})
    logger.log_images(1, {"samples/g0": np.zeros((2, 2, 3), np.uint8)})
    logger.log(2, {"loss": 0.5})
    logger.close()
    assert [r["step"] for r in _read(path)] == [1, 2]
    err = capsys.readouterr().err
    assert err.count("W&B logging disabled") == 1 and "wandb unreachable" in err


def test_log_failure_disables_the_sink_once(tmp_path, monkeypatch, capsys):
    class Failing(_Run):
        def log(self, data):
            raise ConnectionError("gone")

        def finish(self):
            raise AssertionError("finish must not be called on a disabled sink")

    _fake_wandb(monkeypatch, lambda **kwargs: Failing())
    sink = WandbSink(_options(tmp_path), tmp_path / "run", {})
    assert sink.enabled
    sink.log(1, {"loss": 1.0})
    sink.log(2, {"loss": 1.0})
    sink.log_images(2, {"samples/g0": np.zeros((2, 2, 3), np.uint8)})
    sink.close()
    assert capsys.readouterr().err.count("W&B logging disabled (log failed: ConnectionError: gone)") == 1


def test_wandb_missing_disables_the_sink(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    sink = WandbSink(_options(tmp_path), tmp_path / "run", {})
    sink.log(1, {"loss": 1.0})
    sink.close()
    assert not sink.enabled and "ModuleNotFoundError" in capsys.readouterr().err
