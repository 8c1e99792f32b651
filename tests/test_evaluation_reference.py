"""FID reference statistics of a data set: which images, how many, and the recorded provenance. (Over 2 real
ranks: tests/test_tarflow_evaluate.py.)"""

import torch

from data_pipeline import DataConfig
from trainer.evaluation.inception import tiny_fid_inception
from trainer.evaluation.reference import compute_reference_stats, data_config_for


def test_reference_statistics_default_to_one_epoch_of_the_train_split(tmp_path):
    cfg = data_config_for("digits", ["data.random_flip=true"])
    assert cfg == DataConfig(format="embedded", source="digits", random_flip=False)  # never flipped
    stats = compute_reference_stats(cfg, "train", tiny_fid_inception(), batch_size=200, device=torch.device("cpu"))
    assert stats.n == 1617 // 200 * 200 and stats.meta["split"] == "train"  # drop_last: < ranks × batch left out
    assert "drop_last" in stats.meta["note"]
    capped = compute_reference_stats(cfg, "heldout", tiny_fid_inception(), batch_size=64,
                                     device=torch.device("cpu"), max_images=70)
    assert capped.n == 70
