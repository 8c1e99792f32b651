"""`tarflow data write` images/s with 1 and with more worker processes on the same image folder.

The folder holds JPEG crops (of varying size, around ImageNet's shorter side over 2) of the photographs bundled with
scikit-image, in 7 class folders; each write decodes, resizes and centre-crops them (torchvision's Resize +
CenterCrop) and encodes PNG shards, as a real ImageNet-64 preparation does. The worker counts alternate within each
round (A B A B ...), so that background load hits them alike; the ratio is taken per round and over the best times.

    .venv/bin/python bench/data_write.py --images 3000 --workers 1,2 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline.sources import open_source  # noqa: E402
from data_pipeline.writer import write_dataset  # noqa: E402


def make_image_folder(root: Path, count: int, seed: int = 0) -> None:
    import numpy as np
    from PIL import Image

    from data_pipeline.embedded import _PHOTOS, PHOTO_NAMES

    rng = np.random.default_rng(seed)
    photos = [load() for _, load in _PHOTOS]
    for i in range(count):
        label = i % len(photos)
        photo = photos[label]
        h, w = rng.integers(100, 180), rng.integers(100, 180)
        top, left = rng.integers(0, photo.shape[0] - h), rng.integers(0, photo.shape[1] - w)
        folder = root / PHOTO_NAMES[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo[top:top + h, left:left + w]).save(folder / f"{i:06d}.jpg", quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--format", default="webdataset", choices=["webdataset", "mds"])
    parser.add_argument("--workers", default="1,2", help="worker counts to compare, the first is the baseline")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    counts = [int(w) for w in args.workers.split(",")]
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start; {args.images} JPEG images -> "
          f"{args.image_size}px PNG {args.format} shards")
    with tempfile.TemporaryDirectory(prefix="bench-data-write-") as tmp:
        folder = Path(tmp) / "folder"
        make_image_folder(folder, args.images)
        source = open_source(f"imagefolder:{folder}", image_size=args.image_size)
        rates: dict[int, list[float]] = {w: [] for w in counts}
        for round_ in range(args.rounds + 1):  # round 0 warms the page cache and the imports
            for workers in counts:
                out = Path(tmp) / f"out-{workers}"
                start = time.perf_counter()
                write_dataset(source, str(out), args.format, shard_size=8 << 20, workers=workers)
                seconds = time.perf_counter() - start
                shutil.rmtree(out)
                if round_:
                    rates[workers].append(args.images / seconds)
            if round_:
                line = ", ".join(f"{w} workers {rates[w][-1]:.0f} img/s" for w in counts)
                ratios = ", ".join(f"{rates[w][-1] / rates[counts[0]][-1]:.2f}x" for w in counts[1:])
                print(f"round {round_}: {line}; vs {counts[0]}: {ratios}")
        best = {w: max(r) for w, r in rates.items()}
        print("best: " + ", ".join(f"{w} workers {best[w]:.0f} img/s ({best[w] / best[counts[0]]:.2f}x)"
                                   for w in counts) + f"; load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
