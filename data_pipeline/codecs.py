"""Image encodings stored in shards, and decoding with errors that name the shard and the sample."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

ENCODINGS = ("png", "jpeg", "raw")
EXTENSIONS = {"png": "png", "jpeg": "jpg", "raw": "u8"}  # webdataset member suffix per encoding
LABEL_EXTENSION = "cls"


class CorruptSampleError(ValueError):
    """A sample that cannot be decoded or does not match the manifest."""

    def __init__(self, message: str, shard: str, key: str):
        super().__init__(f"{message} (shard {shard}, sample {key})")
        self.shard, self.key = shard, key


def encode_image(image: np.ndarray, encoding: str, jpeg_quality: int = 95) -> bytes:
    """uint8 (C, H, W) with C = 1 or 3 → bytes."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"expected a uint8 image of shape (1 or 3, H, W), got {image.dtype} {image.shape}")
    if encoding == "raw":
        return np.ascontiguousarray(image).tobytes()
    hwc = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    buffer = io.BytesIO()
    if encoding == "png":
        Image.fromarray(hwc).save(buffer, format="PNG", compress_level=1)  # speed over size: shards are re-read
    elif encoding == "jpeg":
        Image.fromarray(hwc).save(buffer, format="JPEG", quality=jpeg_quality)
    else:
        raise ValueError(f"unknown encoding {encoding!r}; choose one of {ENCODINGS}")
    return buffer.getvalue()


def decode_image(data: bytes, encoding: str, shape: tuple[int, int, int], shard: str, key: str) -> np.ndarray:
    """bytes → uint8 (C, H, W), checked against the manifest's shape."""
    channels = shape[0]
    if encoding == "raw":
        expected = int(np.prod(shape))
        if len(data) != expected:
            raise CorruptSampleError(f"raw image has {len(data)} bytes, the manifest's shape {tuple(shape)} needs "
                                     f"{expected}", shard, key)
        return np.frombuffer(data, dtype=np.uint8).reshape(shape)
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            mode = img.mode
            array = np.asarray(img)
    except Exception as e:  # PIL raises several types for broken data
        raise CorruptSampleError(f"cannot decode {encoding} image: {e}", shard, key) from None
    if array.ndim == 2:
        array = array[None]
    else:
        array = array.transpose(2, 0, 1)
    if array.dtype != np.uint8 or tuple(array.shape) != tuple(shape):
        raise CorruptSampleError(f"image is {mode} {tuple(array.shape)} but the manifest says {tuple(shape)} "
                                 f"({channels} channels)", shard, key)
    return np.ascontiguousarray(array)


def encode_label(label: int) -> bytes:
    return str(int(label)).encode()


def decode_label(data: bytes, shard: str, key: str) -> int:
    try:
        return int(data.decode())
    except (UnicodeDecodeError, ValueError):
        raise CorruptSampleError(f"label {data[:20]!r} is not an integer", shard, key) from None
