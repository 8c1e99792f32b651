"""The console: progress lines carry metrics, every other record is a labelled line of its own step."""

import re

from trainer.console_sink import ConsoleSink, format_bytes

METRICS = {"loss": 3.14159, "bits_per_dim": 4.5, "lr": 1e-4, "grad_norm": 0.5321, "images_per_second": 1234.56,
           "mfu": 0.4123}


def test_progress_line_contents(capsys):
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


def test_progress_line_without_total_or_optional_metrics(capsys):
    ConsoleSink().log(5, {"loss": 1.0})
    assert capsys.readouterr().out == "step 5 loss 1.0000\n"


def test_sectioned_training_record_and_its_counters(capsys):
    ConsoleSink(total_steps=10, extra=False).log(
        4, {"train/loss": 2.0, "train/tokens_per_second": 9.0, "train/nonfinite_steps": 2, "data/skipped_corrupt": 3})
    assert capsys.readouterr().out == "step 4/10 40.0% loss 2.0000 nan-skipped 2 data corrupt 3\n"


def test_records_without_a_loss_are_labelled_lines_of_their_own_step(capsys):
    sink = ConsoleSink(total_steps=1000, quiet=("model",))
    sink.log(0, {"model/parameters": 1e6, "train/accumulation_steps": 2})  # setup: the startup summary's
    sink.log(250, {"eval/bits_per_dim": 5.12345, "eval/images": 180})
    sink.log(250, {"checkpoint/save_seconds": 0.8, "checkpoint/blocked_seconds": 0.05, "checkpoint/bytes": 1.2e6})
    sink.log(500, {"checkpoint/failed_step": 500})
    sink.log(750, {"sample/passes_g0": 12})
    assert capsys.readouterr().out.splitlines() == [
        "eval step 250/1000: held-out bpd 5.1235 over 180 images",
        "checkpoint step 250/1000 committed: 1.2 MB in 0.80 s (training waited 0.05 s)",
        "checkpoint step 500/1000 NOT committed (see the warning above); the previous checkpoint is intact",
        "samples step 750/1000: passes_g0 12",
    ]


def test_a_late_checkpoint_record_does_not_move_the_progress_line_back(capsys):
    sink = ConsoleSink(total_steps=1000)
    sink.log(250, METRICS)
    sink.log(500, METRICS)
    sink.log(250, {"checkpoint/save_seconds": 3.0, "checkpoint/blocked_seconds": 0.1, "checkpoint/bytes": 5e8})
    sink.log(750, METRICS)
    progress = [int(m.group(1)) for line in capsys.readouterr().out.splitlines()
                if (m := re.match(r"step (\d+)/1000 ", line))]
    assert progress == [250, 500, 750]


def test_nothing_to_show_prints_nothing(capsys):
    sink = ConsoleSink(total_steps=10, quiet=("model",))
    sink.log(0, {"model/parameters": 5.0})
    sink.log(0, {"train/accumulation_steps": 1})
    sink.log(3, {})
    assert capsys.readouterr().out == ""


def test_format_bytes():
    assert [format_bytes(n) for n in (512, 1500, 391_800, 1.2e6, 7.5e9, 3e12)] == [
        "512 B", "1.5 kB", "391.8 kB", "1.2 MB", "7.5 GB", "3000.0 GB"]
