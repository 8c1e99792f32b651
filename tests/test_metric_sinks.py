"""The JSON-lines sink and the fan-out to every sink."""

import json
import math

import numpy as np
import torch

from trainer.console_sink import ConsoleSink
from trainer.metric_sinks import ImageSink, JsonlSink, MetricLogger, MetricSink


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


def test_metric_logger_fans_out_and_converts(tmp_path, capsys):
    path = tmp_path / "m.jsonl"
    with MetricLogger([ConsoleSink(total_steps=10), JsonlSink(path)]) as logger:
        assert all(isinstance(s, MetricSink) for s in logger.sinks)
        logger.log(1, {"loss": torch.tensor(2.5), "lr": np.float32(0.5)})
    assert _read(path) == [{"step": 1, "loss": 2.5, "lr": 0.5}]
    assert "loss 2.5000" in capsys.readouterr().out


def test_images_go_only_to_sinks_that_take_them(tmp_path):
    class Pictures:
        def __init__(self):
            self.received = []

        def log(self, step, metrics):
            pass

        def log_images(self, step, images):
            self.received.append((step, sorted(images)))

        def close(self):
            pass

    pictures, jsonl = Pictures(), JsonlSink(tmp_path / "m.jsonl")
    assert isinstance(pictures, ImageSink) and not isinstance(jsonl, ImageSink)
    with MetricLogger([jsonl, pictures]) as logger:
        logger.log_images(7, {"samples/g0": np.zeros((4, 4, 3), np.uint8), "samples/g1": np.ones((4, 4, 3), np.uint8)})
    assert pictures.received == [(7, ["samples/g0", "samples/g1"])]
    assert (tmp_path / "m.jsonl").read_text() == ""
