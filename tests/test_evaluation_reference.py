"""FID reference statistics of a data set: which images, how many, and the recorded provenance. (Over 2 real
ranks, with each convention's network: tests/test_tarflow_evaluate.py.)"""

import torch

from data_pipeline import DataConfig
from trainer.evaluation.inception import FIDNetwork
from trainer.evaluation.reference import compute_reference_stats, data_config_for, stats_file_name


class PixelFeatures(FIDNetwork):
    """A stand-in with the networks' interface: which images arrive is the question here, not their features."""

    convention, identity, feature_dim = "pytorch-fid", "pixels (a test stand-in)", 64

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1)[:, :64].float()


def test_reference_statistics_default_to_one_epoch_of_the_train_split():
    cfg = data_config_for("digits", ["data.random_flip=true"])
    assert cfg == DataConfig(format="embedded", source="digits", random_flip=False)  # never flipped
    stats = compute_reference_stats(cfg, "train", PixelFeatures(), batch_size=200, device=torch.device("cpu"))
    assert stats.n == 1617 // 200 * 200 and stats.meta["split"] == "train"  # drop_last: < ranks × batch left out
    assert "drop_last" in stats.meta["note"]
    assert stats.meta["convention"] == "pytorch-fid" and stats.meta["network"] == "pixels (a test stand-in)"
    capped = compute_reference_stats(cfg, "heldout", PixelFeatures(), batch_size=64,
                                     device=torch.device("cpu"), max_images=70)
    assert capped.n == 70


def test_the_official_file_name():
    assert stats_file_name(data_config_for("digits", []), (1, 8, 8), "paper") == "digits_8_fid_stats.pth"
    assert stats_file_name(data_config_for("photos", []), (3, 32, 32), "pytorch-fid") == "photos_32_fid_stats.npz"
    cfg = DataConfig(format="webdataset", uri="s3://bucket/imagenet64/")
    assert stats_file_name(cfg, (3, 64, 64), "paper") == "imagenet64_64_fid_stats.pth"
