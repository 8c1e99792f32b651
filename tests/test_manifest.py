import pytest

from data_pipeline.manifest import Manifest, ManifestError, ShardInfo


def manifest():
    return Manifest(format="webdataset", split="train", num_samples=5, num_classes=2, image_shape=[1, 8, 8],
                    encoding="png", source="digits",
                    shards=[ShardInfo("a.tar", 2, 10, "x"), ShardInfo("b.tar", 3, 12, "y")])


def test_round_trip():
    m = manifest()
    assert Manifest.from_json(m.to_json(), "here") == m


def test_inconsistent_counts_are_rejected():
    text = manifest().to_json().replace('"num_samples": 5', '"num_samples": 6')
    with pytest.raises(ManifestError, match="do not add up to num_samples=6"):
        Manifest.from_json(text, "s3://b/train/manifest.json")


@pytest.mark.parametrize("text", ["{", '{"format": "webdataset"}', "[]"])
def test_garbage_is_rejected_naming_the_file(text):
    with pytest.raises(ManifestError, match="x/manifest.json is not a valid dataset manifest"):
        Manifest.from_json(text, "x/manifest.json")
