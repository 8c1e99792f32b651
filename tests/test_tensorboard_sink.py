"""TensorBoard event files, read back with TensorBoard's own reader."""

import io

import numpy as np
import pytest
from PIL import Image

from trainer.config import LoggingConfig
from trainer.tensorboard_sink import TensorBoardSink, tensorboard_log_dir

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def read_events(log_dir):
    acc = event_accumulator.EventAccumulator(str(log_dir), size_guidance={
        event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0})
    acc.Reload()
    return acc


def test_scalars_and_images_read_back_with_their_steps(tmp_path):
    sink = TensorBoardSink(tmp_path / "tb")
    sink.log(2, {"train/loss": 0.123456789, "train/lr": 1e-3})
    sink.log(4, {"train/loss": 0.1})
    sink.log(2, {"checkpoint/save_seconds": 0.5})  # a record reported after later steps keeps its own step
    grid = np.zeros((24, 40, 3), np.uint8)
    grid[:, :20] = 255
    sink.log_images(4, {"samples/g0": grid})
    sink.close()
    acc = read_events(tmp_path / "tb")
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(2, np.float32(0.123456789)),
                                                                      (4, np.float32(0.1))]
    assert [(e.step, e.value) for e in acc.Scalars("checkpoint/save_seconds")] == [(2, 0.5)]
    (image,) = acc.Images("samples/g0")
    assert (image.step, image.width, image.height) == (4, 40, 24)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB")), grid)


def test_a_resumed_run_replaces_what_an_earlier_attempt_logged_after_its_checkpoint(tmp_path):
    first = TensorBoardSink(tmp_path)
    for step in (1, 2, 3, 4):
        first.log(step, {"train/loss": float(step)})
    first.close()
    resumed = TensorBoardSink(tmp_path, resumed_step=2)  # continued from the checkpoint at step 2
    resumed.log(3, {"train/loss": 30.0})
    resumed.close()
    assert [(e.step, e.value) for e in read_events(tmp_path).Scalars("train/loss")] == [(1, 1.0), (2, 2.0),
                                                                                        (3, 30.0)]


def test_log_dir_is_the_run_dirs_or_a_subdirectory_per_run_of_a_shared_one(tmp_path):
    run_dir = tmp_path / "points" / "c16-s0"
    assert tensorboard_log_dir(LoggingConfig(), run_dir) == run_dir / "tensorboard"
    shared = LoggingConfig(tensorboard_dir=str(tmp_path / "tb"))
    assert tensorboard_log_dir(shared, run_dir) == tmp_path / "tb" / "c16-s0"
    named = LoggingConfig(tensorboard_dir=str(tmp_path / "tb"), run_name="first")
    assert tensorboard_log_dir(named, run_dir) == tmp_path / "tb" / "first"
