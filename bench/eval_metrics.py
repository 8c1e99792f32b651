"""What each sample metric of `tarflow eval` costs per 1,000 digits samples, measured in one run, interleaved.

Times, per 1,000 samples of the embedded default model (configs/digits.yaml: 8×8, class-conditional): drawing the
samples (guidance 0 and 2, the sampler core), the quality metrics' classifier (features and predictions), and the
feature extraction of each FID convention (paper: torch-fidelity's Inception as torchmetrics feeds it; pytorch-fid:
that package's network). The FID networks have random weights (the real ones cannot be downloaded here): the same
layers, so the same cost. The model is freshly initialised: sampling cost does not depend on the weights. The
metrics' final step (FD of the accumulated statistics, k-NN precision/recall) is timed once, outside the loop.

    .venv/bin/python bench/eval_metrics.py [--threads 2] [--repeats 2] [--n 100]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.timing import cpu_benchmark_args, interleaved_best  # noqa: E402
from models import TarFlow  # noqa: E402
from tarflow_testing.evaluation import random_weight_files  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.evaluation.classifier import default_path, find_classifier, save_classifier, train_classifier  # noqa: E402
from trainer.evaluation.inception import PAPER, PYTORCH_FID, load_fid_network, to_uint8  # noqa: E402
from trainer.evaluation.quality import QualityScorer  # noqa: E402
from trainer.evaluation.sampler import SamplingSettings, draw_samples  # noqa: E402
from trainer.runtime import Precision  # noqa: E402

CPU = torch.device("cpu")
FP32 = Precision(None)


def main() -> None:
    args = cpu_benchmark_args(__doc__, repeats=2, n=100)
    n = int(args.n)
    cfg = load_config(None, [])
    torch.manual_seed(0)
    model = TarFlow(cfg.model).eval()
    if not default_path(cfg.data).is_file():
        save_classifier(train_classifier(cfg.data), default_path(cfg.data))
    classifier = find_classifier(cfg.data, device=CPU)
    with tempfile.TemporaryDirectory() as tmp:  # each library's network with random weights, from its own file
        weights = random_weight_files(Path(tmp))
        nets = {c: load_fid_network(str(weights), c, CPU) for c in (PAPER, PYTORCH_FID)}

    def sample(guidance: float) -> torch.Tensor:
        s = SamplingSettings(guidance=guidance)
        return torch.cat([b.images for b in draw_samples(model, range(n), s, base_seed=0, batch_size=n, device=CPU,
                                                         precision=FP32)])

    images = sample(0.0)
    pixels, labels = to_uint8(images), torch.arange(n) % cfg.model.num_classes

    def quality() -> QualityScorer:
        scorer = QualityScorer(classifier, CPU)
        scorer.update(list(range(n)), labels, pixels)
        return scorer

    cases = {
        "sampling, guidance 0": lambda: sample(0.0),
        "sampling, guidance 2": lambda: sample(2.0),
        "quality: classifier": quality,
        "FID paper: torch-fidelity Inception": lambda: nets[PAPER].features(images),
        "FID pytorch-fid: its Inception": lambda: nets[PYTORCH_FID].features(images),
    }
    best = interleaved_best(list(cases.values()), args.repeats)
    print(f"{n} samples per call, scaled to 1,000")
    for name, seconds in zip(cases, best):
        print(f"  {name:38s} {seconds * 1000 / n:9.2f} s per 1,000 samples")
    start = time.perf_counter()
    result = quality().finish(0)
    print(f"  quality: metrics from the features     {time.perf_counter() - start:9.3f} s (once, {n} samples; "
          f"class accuracy {result.class_accuracy:.3f} of an untrained model)")


if __name__ == "__main__":
    main()
