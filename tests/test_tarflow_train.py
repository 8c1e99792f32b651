"""``tarflow train --print-config``: the resolved YAML, which fed back as CONFIG is the same config; the flags go
anywhere among CONFIG and the overrides, and write nothing."""

from pathlib import Path

from tarflow.main import main
from tarflow_testing.runs import REPO
from trainer.config import load_config, to_yaml

PHOTOS = str(REPO / "configs" / "photos.yaml")
OVERRIDES = ["optim.lr=0.0005", "train.steps=700", "model.num_classes=0", "sample.guidance=2.5"]


def test_printed_config_fed_back_is_the_same_config(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", PHOTOS, *OVERRIDES, "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []  # nothing written, no run directory
    expected = load_config(PHOTOS, OVERRIDES)
    assert printed == to_yaml(expected) and "lr: 0.0005" in printed
    saved = Path(tmp_path / "printed.yaml")
    saved.write_text(printed)
    assert load_config(saved) == expected
    assert main(["train", "--print-config", str(saved)]) == 0  # the flag before CONFIG works too
    assert capsys.readouterr().out == printed


def test_print_config_is_validated_for_the_planned_launch(capsys):
    assert main(["train", "--print-config", "--world-size", "4", "train.global_batch=64",
                 "train.micro_batch=16"]) == 0
    assert "global_batch: 64" in capsys.readouterr().out
    assert main(["train", "train.global_batch=64", "train.micro_batch=32", "--print-config", "--world-size=4"]) == 2
    assert "train.global_batch: 64 is not divisible by train.micro_batch × data-parallel size = 32 × 4" in \
        capsys.readouterr().err


def test_unknown_or_misplaced_flags_are_one_line_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "train.steps=3", "--dryrun"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "does not know the option '--dryrun'" in err
    assert main(["train", "--world-size", "8", "train.steps=3"]) == 2
    assert "use them with --dry-run or --print-config" in capsys.readouterr().err
    assert main(["train", "--all-strategies", "train.steps=3"]) == 2
    assert "use it with --dry-run" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
