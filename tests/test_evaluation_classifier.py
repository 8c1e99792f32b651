"""The quality metrics' classifier (``trainer.evaluation.classifier``): trained on the train split only, accurate on
the held-out digits, deterministic, cached where the metrics look, refused on other data."""

import pytest
import torch

from trainer.config import load_config
from trainer.evaluation.classifier import (
    ClassifierError,
    Recipe,
    default_path,
    find_classifier,
    load_classifier,
    predict,
    save_classifier,
    split_arrays,
    train_classifier,
)

# measured: 0.9833 held-out accuracy (177 / 180) with the default recipe and split
MIN_HELDOUT_ACCURACY = 0.95


def data(*overrides):
    return load_config(None, list(overrides)).data


def test_it_is_accurate_on_the_heldout_digits_it_never_saw(digits_classifier):
    clf = load_classifier(digits_classifier)
    m = clf.meta
    assert m["heldout_accuracy"] >= MIN_HELDOUT_ACCURACY, m["heldout_accuracy"]
    assert (m["train_images"], m["heldout_images"]) == (1617, 180)  # the trainer's split: 10% held out
    assert m["dataset"] == {"format": "embedded", "source": "digits", "heldout_fraction": 0.1, "split_seed": 0}
    assert (clf.image_shape, clf.num_classes) == ((1, 8, 8), 10)
    # the stored reference is the held-out split's, as the network sees it now
    x_train, _, x_held, y_held = split_arrays(data())
    features, predictions = predict(clf.net, x_held)
    torch.testing.assert_close(features, clf.heldout_features)
    assert torch.equal(predictions, clf.heldout_predictions) and torch.equal(y_held, clf.heldout_labels)
    # never trained on a held-out image: the two splits share no image index
    assert len(x_train) + len(x_held) == 1797


def test_training_is_deterministic_from_its_seed():
    short = Recipe(epochs=2)
    a, b = train_classifier(data(), short), train_classifier(data(), short)
    for (name, pa), pb in zip(a.net.state_dict().items(), b.net.state_dict().values()):
        assert torch.equal(pa, pb), name
    c = train_classifier(data(), Recipe(epochs=2, seed=1))
    assert not torch.equal(a.net.head.weight, c.net.head.weight)


def test_the_cache_is_found_by_data_set_and_split_and_refused_on_other_data(digits_classifier, tmp_path,
                                                                               monkeypatch):
    monkeypatch.setenv("TARFLOW_CACHE", str(tmp_path / "cache"))
    path = default_path(data())
    assert path.parent == tmp_path / "cache" and path.name.startswith("classifier-digits-")
    assert default_path(data("data.split_seed=1")) != path != default_path(data(), Recipe(seed=1))
    with pytest.raises(ClassifierError, match="train it once with `tarflow eval classifier train digits "
                                              "data.heldout_fraction=0.1 data.split_seed=0`"):
        find_classifier(data())
    save_classifier(load_classifier(digits_classifier), path)
    clf = find_classifier(data(), image_shape=(1, 8, 8), num_classes=10)
    assert clf.path == str(path)
    find_classifier(data(), image_shape=(1, 8, 8), num_classes=0)  # an unconditional model: any classes
    with pytest.raises(ClassifierError, match="cache"):
        find_classifier(data("data.heldout_fraction=0.2"))
    with pytest.raises(ClassifierError, match=r"trained on digits \(1×8×8, 10 classes.*but the checkpoint has "
                                              r"3×32×32 images of 7 classes"):
        find_classifier(data(), image_shape=(3, 32, 32), num_classes=7)
    with pytest.raises(ClassifierError, match="has 1×8×8 images of 7 classes"):
        clf.check_images((1, 8, 8), 7)
    (tmp_path / "junk.pt").write_bytes(b"not a classifier")
    with pytest.raises(ClassifierError, match="is not a classifier file"):
        load_classifier(tmp_path / "junk.pt")
    with pytest.raises(ClassifierError, match="support the embedded sets"):
        default_path(data("data.format=webdataset", "data.uri=/nowhere"))
