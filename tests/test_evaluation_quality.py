"""The offline quality metrics (``trainer.evaluation.quality``) and ``tarflow eval --metric quality``: held-out data
fed as samples score the classifier's own held-out accuracy, FD 0 and precision = recall = 1; two ranks give one
process's numbers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tarflow.main import main
from tarflow_testing.evaluation import CPU, export, perturbed_model
from trainer.config import load_config
from trainer.evaluation.classifier import load_classifier, split_arrays
from trainer.evaluation.quality import QualityScorer, baseline, feature_fd, precision_recall

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def classifier(digits_classifier):
    return load_classifier(digits_classifier)


def test_heldout_data_as_samples_score_the_classifiers_heldout_accuracy_fd_0_and_full_precision_recall(classifier):
    _, _, images, labels = split_arrays(load_config(None, []).data)
    scorer = QualityScorer(classifier, CPU)
    for start in range(0, len(images), 64):  # in batches, out of order: the scorer orders by index
        idx = list(range(start, min(start + 64, len(images))))[::-1]
        scorer.update(idx, labels[idx], images[idx])
    q = scorer.finish()
    assert q.num_samples == 180
    assert q.class_accuracy == pytest.approx(classifier.meta["heldout_accuracy"], abs=1e-12)
    assert abs(q.classifier_fd) < 1e-6
    assert (q.precision, q.recall) == (1.0, 1.0)


def test_the_halves_of_the_heldout_split_give_the_floor(classifier):
    b = baseline(classifier)
    f = classifier.heldout_features
    assert b["heldout_images"] == 180 and b["heldout_accuracy"] == classifier.meta["heldout_accuracy"]
    assert b["halves_fd"] == pytest.approx(feature_fd(f[0::2], f[1::2])) and b["halves_fd"] > 0
    assert abs(feature_fd(f, f)) < 1e-6
    assert 0.5 < b["halves_precision"] <= 1 and 0.5 < b["halves_recall"] <= 1


def test_precision_and_recall_of_separate_and_nested_clouds():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(200, 4, generator=g)
    assert precision_recall(real, real + 100.0) == (0.0, 0.0)  # far apart: neither covers the other
    # samples collapsed onto a tiny part of the data: precise, without recall
    precision, recall = precision_recall(real, real[:40] * 0.01 + real[0])
    assert precision == 1.0 and recall < 0.2
    # recall is averaged over groups of len(real) samples; an incomplete last group is left out
    p2, r2 = precision_recall(real, torch.cat([real, real, real[:50]]))
    assert (p2, r2) == (1.0, 1.0)


# ---------------------------------------------------------------- the command, one process and two ranks
def quality_args(ckpt, clf, out) -> list[str]:
    return ["eval", str(ckpt), "--metric", "quality", "--num-samples", "24", "--guidance", "0", "2",
            "--classifier", str(clf), "--batch-size", "5", "--seed", "3", "--device", "cpu", "--out", str(out)]


def two_rank_worker(argv: list[str]) -> None:
    root = Path(argv[0])
    files = json.loads((root / "files.json").read_text())
    assert main(quality_args(files["ckpt"], files["classifier"], root / "two")) == 0


@pytest.fixture(scope="module")
def files(tmp_path_factory, digits_classifier):
    root = tmp_path_factory.mktemp("quality")
    model, cfg = perturbed_model()
    return {"root": root, "ckpt": export(model, cfg, root / "model.pt"), "classifier": digits_classifier}


def test_a_guidance_sweep_on_two_ranks_equals_one_process(files, tmp_path, capsys):
    from tarflow_testing.runs import free_port

    root = files["root"]
    (root / "files.json").write_text(json.dumps({k: str(v) for k, v in files.items()}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-backend=c10d", __file__, str(root)]
    result = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert main(quality_args(files["ckpt"], files["classifier"], tmp_path / "one")) == 0
    one = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    two = json.loads((root / "two" / "results.json").read_text())
    assert (one["ranks"], two["ranks"], one["metric"]) == (1, 2, "quality") and "fid" not in one
    assert one["classifier"]["baseline"] == two["classifier"]["baseline"]
    assert one["classifier"]["heldout_accuracy"] >= 0.9
    for a, b in zip(one["results"], two["results"], strict=True):
        assert a["num_samples"] == b["num_samples"] == 24 and a["nan_redraws"] == b["nan_redraws"]
        assert a["fid"] is None and a["class_accuracy"] is not None
        assert (a["class_accuracy"], a["precision"], a["recall"]) == (b["class_accuracy"], b["precision"],
                                                                      b["recall"])
        assert b["classifier_fd"] == pytest.approx(a["classifier_fd"], rel=1e-5)
        assert b["sample_bits_per_dim"] == pytest.approx(a["sample_bits_per_dim"], rel=1e-4)
    header, *rows = (root / "two" / "sweep.csv").read_text().splitlines()
    assert "class_accuracy,classifier_fd,precision,recall" in header and len(rows) == 2
    assert (root / "two" / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert not list((root / "two").glob("samples_*_stats.*"))  # no FID network: no FID statistics


def test_the_metric_finds_the_cache_or_says_how_to_make_it(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TARFLOW_CACHE", str(tmp_path))
    args = ["eval", str(files["ckpt"]), "--metric", "quality", "--num-samples", "10", "--batch-size", "10", "--no-bpd",
            "--device", "cpu"]
    assert main(args) == 2
    assert "train it once with `tarflow eval classifier train digits" in capsys.readouterr().err
    assert main(["eval", "classifier", "train", "digits", "--seed", "0"]) == 0
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert Path(trained["out"]).parent == tmp_path and trained["train_seconds"] < 60
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["classifier"]["file"] == trained["out"] and 0 <= report["class_accuracy"] <= 1
    assert report["classifier_fd"] > 0 and 0 <= report["precision"] <= 1
    assert main([*args, "--ref-stats", "x.npz"]) == 2
    assert "--ref-stats applies to the FID" in capsys.readouterr().err
    assert main(["eval", str(files["ckpt"]), "--classifier", "x.pt"]) == 2
    assert "--classifier applies to --metric quality only" in capsys.readouterr().err


if __name__ == "__main__":
    two_rank_worker(sys.argv[1:])
