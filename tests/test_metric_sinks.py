import json
import math
import sys
import types

import numpy as np
import pytest
import torch

from trainer.metric_sinks import RUN_ID_FILE, ConsoleSink, JsonlSink, MetricLogger, MetricSink, WandbSink

METRICS = {"loss": 3.14159, "bits_per_dim": 4.5, "lr": 1e-4, "grad_norm": 0.5321, "images_per_second": 1234.56,
           "mfu": 0.4123}


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_content_and_append_on_resume(tmp_path):
    path = tmp_path / "logs" / "metrics.jsonl"
    sink = JsonlSink(path)
    sink.log(1, {"loss": 2.0, "lr": 1e-3})
    # Flushed per line: readable before close.
    assert _read(path) == [{"step": 1, "loss": 2.0, "lr": 1e-3}]
    sink.log(2, {"loss": float("nan")})
    sink.close()

    resumed = JsonlSink(path)
    resumed.log(3, {"loss": 1.5})
    resumed.close()
    records = _read(path)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert math.isnan(records[1]["loss"]) and records[2] == {"step": 3, "loss": 1.5}


def test_jsonl_resume_drops_torn_line_and_steps_after_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    sink = JsonlSink(path)
    for step in (10, 20, 30):
        sink.log(step, {"loss": float(step)})
    sink.close()
    with open(path, "a") as f:
        f.write('{"step": 40, "lo')  # crash mid-write

    resumed = JsonlSink(path, truncate_after_step=20)  # the checkpoint was at step 20
    resumed.log(30, {"loss": 29.0})
    resumed.close()
    assert _read(path) == [{"step": 10, "loss": 10.0}, {"step": 20, "loss": 20.0}, {"step": 30, "loss": 29.0}]


def test_console_line_contents(capsys):
    sink = ConsoleSink(total_steps=1000, bar_width=10)
    sink.log(120, {**METRICS, "val_bpd": 4.25})
    sink.log(240, METRICS)
    sink.close()
    first, second = capsys.readouterr().out.splitlines()
    assert first.startswith("step 120/1000 12.0% [#---------] ")
    for piece in ("loss 3.1416", "bpd 4.5000", "lr 1.00e-04", "gnorm 0.532", "img/s 1234.6", "mfu 41.2%",
                  "val_bpd 4.25"):
        assert piece in first
    assert "eta" not in first and " eta " in second  # the rate needs two lines


def test_console_without_total_or_optional_metrics(capsys):
    ConsoleSink().log(5, {"loss": 1.0})
    assert capsys.readouterr().out == "step 5 loss 1.0000\n"


def test_metric_logger_fans_out_and_converts(tmp_path, capsys):
    path = tmp_path / "m.jsonl"
    with MetricLogger([ConsoleSink(total_steps=10), JsonlSink(path)]) as logger:
        assert all(isinstance(s, MetricSink) for s in logger.sinks)
        logger.log(1, {"loss": torch.tensor(2.5), "lr": np.float32(0.5)})
    assert _read(path) == [{"step": 1, "loss": 2.5, "lr": 0.5}]
    assert "loss 2.5000" in capsys.readouterr().out


def test_wandb_offline_run_dir_and_stable_run_id(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    sink = WandbSink("tarflow-test", run_dir, {"channels": 32}, run_name="tiny")
    assert sink.enabled
    sink.log(1, {"loss": 2.0})
    sink.log(2, {"loss": 1.0})
    sink.close()
    run_id = (run_dir / RUN_ID_FILE).read_text().strip()
    offline_runs = list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline_runs) == 1 and list(offline_runs[0].glob("*.wandb"))

    resumed = WandbSink("tarflow-test", run_dir, {"channels": 32})  # a resumed run reuses the id
    assert resumed.enabled and resumed.run_id == run_id
    resumed.log(2, {"loss": 0.9})  # a step logged again after resuming from an earlier checkpoint
    resumed.close()


def test_wandb_init_failure_disables_sink_and_logging_continues(tmp_path, monkeypatch, capsys):
    fake = types.ModuleType("wandb")

    def init(**kwargs):
        raise TimeoutError("wandb unreachable")

    fake.init = init
    fake.Settings = lambda **kwargs: kwargs
    monkeypatch.setitem(sys.modules, "wandb", fake)

    path = tmp_path / "m.jsonl"
    sink = WandbSink("p", tmp_path / "run", {})
    assert not sink.enabled
    logger = MetricLogger([sink, JsonlSink(path)])
    logger.log(1, {"loss": 1.0})
    logger.log(2, {"loss": 0.5})
    logger.close()
    assert [r["step"] for r in _read(path)] == [1, 2]
    err = capsys.readouterr().err
    assert err.count("W&B logging disabled") == 1 and "wandb unreachable" in err


def test_wandb_log_failure_disables_sink_once(tmp_path, monkeypatch, capsys):
    class Run:
        def define_metric(self, *args, **kwargs):
            pass

        def log(self, data):
            raise ConnectionError("gone")

        def finish(self):
            raise AssertionError("finish must not be called on a disabled sink")

    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: Run()
    fake.Settings = lambda **kwargs: kwargs
    monkeypatch.setitem(sys.modules, "wandb", fake)

    sink = WandbSink("p", tmp_path / "run", {})
    assert sink.enabled
    sink.log(1, {"loss": 1.0})
    sink.log(2, {"loss": 1.0})
    sink.close()
    assert capsys.readouterr().err.count("W&B logging disabled (log failed: ConnectionError: gone)") == 1


def test_wandb_missing_disables_sink(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    sink = WandbSink("p", tmp_path / "run", {})
    sink.log(1, {"loss": 1.0})
    sink.close()
    assert not sink.enabled and "ModuleNotFoundError" in capsys.readouterr().err
