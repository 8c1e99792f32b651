"""Sources for `tarflow data write`: resized as the official code prepares images (torchvision's ImageFolder with
Resize + CenterCrop, checked against torchvision itself), and unreadable files named in one line."""

import numpy as np
import pytest
from PIL import Image

from data_pipeline.sources import open_source
from data_pipeline.writer import write_dataset
from tarflow.main import main

SIZE = 24


def _image_folder(root):
    """Images of many shapes and modes: portrait, landscape, square, smaller than SIZE (upscaled), odd and even
    margins (torchvision rounds half to even), grey, palette, RGBA, a JPEG of a real photograph; a sub-folder (the
    order of files) and a GIF (not an ImageFolder suffix)."""
    import skimage.data

    rng = np.random.default_rng(0)
    shapes = [(37, 23), (23, 37), (SIZE, SIZE), (SIZE, SIZE + 1), (SIZE + 3, SIZE), (SIZE + 5, SIZE),
              (10, 15), (100, 63), (63, 101), (301, 200)]
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    for n, (h, w) in enumerate(shapes):
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "a" / f"{n:02d}.png")
    grey = rng.integers(0, 256, (41, 29), dtype=np.uint8)
    Image.fromarray(grey).save(root / "b" / "grey.png")
    Image.fromarray(rng.integers(0, 256, (30, 45, 3), dtype=np.uint8)).convert("P").save(root / "b" / "palette.png")
    Image.fromarray(grey).save(root / "b" / "ignored.gif")
    (root / "b" / "nested").mkdir()
    Image.fromarray(rng.integers(0, 256, (26, 50, 3), dtype=np.uint8)).save(root / "b" / "nested" / "x.bmp")
    Image.fromarray(rng.integers(0, 256, (50, 26, 3), dtype=np.uint8)).save(root / "b" / "z.webp", lossless=True)
    Image.fromarray(rng.integers(0, 256, (33, 47, 4), dtype=np.uint8), "RGBA").save(root / "b" / "alpha.png")
    Image.fromarray(skimage.data.astronaut()).resize((180, 130)).save(root / "b" / "photo.jpg", quality=90)


def test_imagefolder_pixels_equal_torchvision_imagefolder_with_resize_and_center_crop(tmp_path):
    from torchvision import datasets, transforms

    _image_folder(tmp_path / "folder")
    source = open_source(f"imagefolder:{tmp_path / 'folder'}", image_size=SIZE, heldout_fraction=0.25)
    official = datasets.ImageFolder(str(tmp_path / "folder"),
                                    transforms.Compose([transforms.Resize(SIZE), transforms.CenterCrop(SIZE)]))
    samples = list(source.splits["train"]()) + list(source.splits["heldout"]())
    assert len(samples) == len(official) == 16
    for key, image, label in samples:
        expected, expected_label = official[int(key.split("-")[1])]  # keys are indices into the sorted files
        assert label == expected_label
        assert image.shape == (3, SIZE, SIZE)
        assert np.array_equal(image, np.asarray(expected).transpose(2, 0, 1)), key


def test_array_sources_resize_as_torchvision_does(tmp_path):
    from torchvision import transforms

    official = transforms.Compose([transforms.Resize(20), transforms.CenterCrop(20)])
    source = open_source("photos", image_size=20)  # 32×32 crops down to 20
    data = {key: image for key, image, _ in source.splits["heldout"]()}
    from data_pipeline.embedded import load_embedded

    photos = load_embedded("photos").images
    for key, image in list(data.items())[:20]:
        pil = Image.fromarray(photos[int(key.split("-")[1])].transpose(1, 2, 0))
        assert np.array_equal(image, np.asarray(official(pil)).transpose(2, 0, 1)), key
    digits = open_source("digits", image_size=12)  # one channel, upscaled
    key, image, _ = next(digits.splits["train"]())
    pil = Image.fromarray(load_embedded("digits").images[int(key.split("-")[1])][0])
    assert np.array_equal(image[0], np.asarray(transforms.Compose([transforms.Resize(12),
                                                                   transforms.CenterCrop(12)])(pil)))


@pytest.mark.parametrize("workers", [1, 2])
def test_an_unreadable_image_is_one_line_naming_the_file_and_finished_shards_stay(tmp_path, capsys, workers):
    folder = tmp_path / "folder"
    (folder / "c").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(folder / "c" / f"{i:02d}.png")
    source = open_source(f"imagefolder:{folder}", image_size=8, heldout_fraction=0.1)
    # the file at train position 30: keys are indices into the sorted files
    index = int(list(source.splits["train"]())[30][0].split("-")[1])
    bad = sorted((folder / "c").iterdir())[index]
    bad.write_bytes(b"not an image")
    args = ["data", "write", "--source", f"imagefolder:{folder}", "--image-size", "8", "--format", "webdataset",
            "--out", str(tmp_path / "out"), "--shard-size", "5000", "--workers", str(workers)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("tarflow data: error: cannot read image ") and str(bad) in err
    train = tmp_path / "out" / "train"
    finished = sorted(p.name for p in train.glob("shard-*.tar"))
    assert finished and not (train / "manifest.json").exists()
    before = {name: (train / name).stat().st_mtime_ns for name in finished}

    Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(bad, format="PNG")
    reference = write_dataset(open_source(f"imagefolder:{folder}", image_size=8), str(tmp_path / "ref"),
                              "webdataset", shard_size=5000)
    # every shard that ended before the bad image (a shard ends when the next sample is seen) was finished, whatever
    # the workers, with the bytes of an uninterrupted write
    ends = np.cumsum([s.num_samples for s in reference["train"].shards])
    assert finished == [s.name for s, end in zip(reference["train"].shards, ends) if end < 30]
    for name in finished:
        assert (train / name).read_bytes() == (tmp_path / "ref" / "train" / name).read_bytes()
    assert main(args) == 0
    assert {name: (train / name).stat().st_mtime_ns for name in finished} == before
    for split, manifest in reference.items():
        assert (tmp_path / "out" / split / "manifest.json").read_text() == manifest.to_json()
