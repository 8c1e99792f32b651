import numpy as np
import pytest

from data_pipeline.codecs import CorruptSampleError, decode_image, decode_label, encode_image, encode_label

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("encoding", ["png", "raw"])
def test_lossless_round_trip(channels, encoding):
    image = RNG.integers(0, 256, (channels, 5, 7), dtype=np.uint8)
    assert np.array_equal(decode_image(encode_image(image, encoding), encoding, image.shape, "s", "k"), image)


def test_corrupt_bytes_name_the_shard_and_key():
    data = encode_image(RNG.integers(0, 256, (3, 8, 8), dtype=np.uint8), "png")
    with pytest.raises(CorruptSampleError, match=r"cannot decode png image.*\(shard s-3.tar, sample train-7\)"):
        decode_image(data[: len(data) // 2], "png", (3, 8, 8), "s-3.tar", "train-7")


def test_channel_or_size_mismatch_with_the_manifest():
    grey = encode_image(RNG.integers(0, 256, (1, 8, 8), dtype=np.uint8), "png")
    with pytest.raises(CorruptSampleError, match=r"image is L \(1, 8, 8\) but the manifest says \(3, 8, 8\)"):
        decode_image(grey, "png", (3, 8, 8), "s", "k")
    with pytest.raises(CorruptSampleError, match="raw image has 64 bytes"):
        decode_image(bytes(64), "raw", (3, 8, 8), "s", "k")


def test_labels():
    assert decode_label(encode_label(7), "s", "k") == 7
    with pytest.raises(CorruptSampleError, match="not an integer"):
        decode_label(b"seven", "s", "k")


def test_unknown_encoding():
    with pytest.raises(ValueError, match="unknown encoding"):
        encode_image(np.zeros((1, 2, 2), np.uint8), "gif")
