"""Progress bars of the evaluation passes: shown on rank 0 at a terminal only, counting every image of the pass."""

import io
import sys

import pytest

import trainer.evaluation.reference as reference
import trainer.evaluation.sweep as sweep
from tarflow_testing.evaluation import CPU, FP32, perturbed_model
from trainer.evaluation.inception import load_fid_network
from trainer.evaluation.progress import progress_bar
from trainer.evaluation.reference import compute_reference_stats, data_config_for
from trainer.evaluation.sweep import evaluate_setting, sweep_settings


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_shown_on_rank_0_at_a_terminal_and_quiet_otherwise():
    for stream, rank, shown in ((Terminal(), 0, True), (io.StringIO(), 0, False), (Terminal(), 1, False)):
        with progress_bar(10, "work", rank=rank, file=stream) as bar:
            bar.update(10)
        assert ("work" in stream.getvalue()) is shown, (type(stream).__name__, rank)


def test_the_default_stream_is_stderr(monkeypatch):
    monkeypatch.setattr("sys.stderr", Terminal())  # in the test itself: pytest's capture resets it between phases
    with progress_bar(3, "default stream") as bar:
        bar.update(3)
    assert "default stream" in sys.stderr.getvalue()


@pytest.fixture
def bars(monkeypatch):
    """Every bar the passes make, drawn on a terminal (where bars count)."""
    made = []

    def recording(*args, **kwargs):
        made.append(progress_bar(*args, **kwargs, file=Terminal()))
        return made[-1]

    monkeypatch.setattr(reference, "progress_bar", recording)
    monkeypatch.setattr(sweep, "progress_bar", recording)
    return made


def test_reference_statistics_count_every_image_they_read(bars):
    class Pixels(reference.FIDNetwork):
        convention, identity, feature_dim = "pytorch-fid", "pixels", 16

        def features(self, images):
            return images.flatten(1)[:, :16].float()

    cfg = data_config_for("digits", [])
    stats = compute_reference_stats(cfg, "heldout", Pixels(), batch_size=64, device=CPU, max_images=70)
    (bar,) = bars
    assert bar.n == bar.total == stats.n == 70 and bar.desc.startswith("statistics of heldout")


def test_fid_sampling_counts_every_sample_of_every_rank(bars):
    model, _ = perturbed_model()
    (setting,) = sweep_settings([1.0], [1.0], annealed=False, denoise_stds=[None])
    evaluate_setting(model, load_fid_network("tiny-random", "pytorch-fid"), None, setting, num_samples=6,
                     base_seed=0, batch_size=4, device=CPU, precision=FP32, sample_bpd=False)
    (bar,) = bars
    assert bar.n == bar.total == 6 and bar.desc.startswith("sampling g1_t1")
