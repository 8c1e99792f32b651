"""Data throughput: images/s delivered by each sharded reader (local and S3, 0/1/2 workers) beside a plain
ImageFolder + PIL loader over the same images, and beside what one training step of the default configs consumes.

    .venv/bin/python bench/data.py [--sizes 32,64] [--epochs 2] [--batch 64] [--formats webdataset] [--stores local]

S3 is a moto server on loopback started by this script. Ratios are measured in one run, interleaved: every reader
right after ImageFolder, ``--repeats`` times, so that a change in the machine's load hits both sides of a ratio.

The MDS reader's profile (cProfile, 0 workers, 32×32 photos, 2 epochs; 2 loaded cores). Through streaming's own
``StreamingDataset.__iter__`` it ran at 0.3–0.7× ImageFolder: 31 s for 8240 samples, of which PIL's decoder 7.4 s
and ``Image.open`` 4.1 s (the same work takes 0.6 s and 1.4 s without streaming's threads: its prepare and ready
threads step through the epoch sample by sample, polling shared state every 7 ms, and hold the GIL the decoding
needs), ``get_item`` 6.3 s (a shard file opened, sought and closed per sample: ``io.open`` 2.1 s, its spanner
0.6 s). Reading a worker's sample ids in streaming's order from whole shard files mapped once per process, with
one download-ahead thread per shard instead of per sample (``data_pipeline/mds_streaming.py``): 5.8 s, of which
PNG decoding 3.6 s, streaming's column decoding 0.5 s, the float conversion 0.4 s. With workers the other fixed
cost was starting the workers every epoch (about 0.15 s of a 1.7 s epoch here): the MDS reader now keeps its
train workers across epochs, as ImageFolder does.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data_pipeline import DataConfig, build_loader  # noqa: E402
from data_pipeline.sources import open_source  # noqa: E402
from data_pipeline.writer import write_dataset  # noqa: E402


def imagefolder_baseline(root: Path, batch: int, workers: int, epochs: int) -> float:
    import torchvision
    from torchvision import transforms

    dataset = torchvision.datasets.ImageFolder(str(root), transform=transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize(0.5, 0.5)]))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                                         drop_last=True, persistent_workers=workers > 0)
    return _images_per_second(lambda: iter(loader), len(loader), epochs)


def sharded(cfg: DataConfig, batch: int, epochs: int) -> float:
    with build_loader(cfg, "train", batch, seed=0) as loader:
        batches = iter(loader)
        return _images_per_second(lambda: batches, loader.batches_per_epoch, epochs, reuse=True)


def _images_per_second(make_iter, batches_per_epoch: int, epochs: int, reuse: bool = False) -> float:
    """Timed from the first request: a sharded reader fills its shuffle buffers before its first batch of every
    epoch, so leaving the first batch out would leave out a part of the reading that differs between readers."""
    images, start = 0, time.perf_counter()
    it = make_iter()
    for epoch in range(epochs):
        if not reuse and epoch:
            it = make_iter()
        for _ in range(batches_per_epoch):
            x, *_ = next(it)
            images += x.shape[0]
    return images / (time.perf_counter() - start)


def training_consumption(config_path: str) -> tuple[str, float]:
    """Images/s one training step of a shipped config consumes on this machine (forward, backward, AdamW)."""
    from models import TarFlow
    from trainer.config import load_config

    cfg = load_config(config_path)
    model = TarFlow(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    b = cfg.train.micro_batch
    x = torch.rand(b, cfg.model.in_channels, cfg.model.img_size, cfg.model.img_size) * 2 - 1
    y = torch.randint(0, max(cfg.model.num_classes, 1), (b,)) if cfg.model.num_classes else None
    for i in range(4):
        if i == 1:
            start = time.perf_counter()
        opt.zero_grad()
        TarFlow.loss(*model(x, y)).backward()
        opt.step()
    return Path(config_path).stem, 3 * b / (time.perf_counter() - start)


def bench_source(size: int, copies: int):
    """The photo crops at ``size``, repeated ``copies`` times (horizontally shifted so copies differ), so that an
    epoch is long enough for worker start-up not to dominate."""
    from data_pipeline.sources import Source

    base = open_source("photos", image_size=size)
    train = [(image, label) for _, image, label in base.splits["train"]()]

    def samples():
        for c in range(copies):
            for i, (image, label) in enumerate(train):
                yield f"train-{c * len(train) + i:08d}", np.ascontiguousarray(np.roll(image, c, axis=2)), label

    return Source(f"photos{size}x{copies}", base.num_classes, base.image_shape,
                  {"train": samples, "heldout": base.splits["heldout"]},
                  {"train": copies * len(train), "heldout": base.counts["heldout"]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="32,64")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--copies", type=int, default=8, help="repeat the 518 photo crops this many times")
    parser.add_argument("--formats", default="webdataset,mds", help="sharded readers to measure")
    parser.add_argument("--stores", default="local,s3", help="where their shards are: local, s3 or both")
    parser.add_argument("--repeats", type=int, default=3,
                        help="measure ImageFolder and every reader this many times, interleaved (A B A B ...)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # loaders are what is measured; one thread per process as in training
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update({"AWS_ENDPOINT_URL": f"http://{host}:{port}", "S3_ENDPOINT_URL": f"http://{host}:{port}",
                       "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1"})
    boto3.client("s3").create_bucket(Bucket="bench")

    consumption = dict(training_consumption(p) for p in ("configs/digits.yaml", "configs/photos.yaml"))
    need = consumption["photos"]  # the default config on 32×32 images (a 64×64 model consumes fewer images/s)
    print("one training step consumes: " + ", ".join(f"{n} {v:.0f} img/s" for n, v in consumption.items())
          + "; the ratio column is against 3 × photos")
    print(f"{'size':<6}{'reader':<26}{'workers':>8}{'img/s':>10}{'vs ImageFolder':>16}{'range':>13}"
          f"{'vs 3×training':>15}")
    print("(ImageFolder and the MDS reader keep their workers across epochs, webdataset starts its each epoch. "
          f"Each reader is measured {args.repeats}× right after ImageFolder; img/s: the median; vs ImageFolder: the "
          "median and range of those adjacent ratios)")
    with tempfile.TemporaryDirectory() as tmp:
        for size in [int(s) for s in args.sizes.split(",")]:
            source = bench_source(size, args.copies)
            folder = Path(tmp) / f"folder{size}"
            from PIL import Image
            for key, image, label in source.splits["train"]():
                (folder / str(label)).mkdir(parents=True, exist_ok=True)
                Image.fromarray(image.transpose(1, 2, 0)).save(folder / str(label) / f"{key}.png")
            cases = []
            for fmt in args.formats.split(","):
                uris = {"local": str(Path(tmp) / f"{fmt}{size}"), "s3": f"s3://bench/{fmt}{size}"}
                for store in args.stores.split(","):
                    write_dataset(source, uris[store], fmt, shard_size=256 << 10)
                    cases.append((f"{fmt} {store}", uris[store]))
            for workers in [int(w) for w in args.workers.split(",")]:
                base_rates, rates = [], {name: [] for name, _ in cases}
                for repeat in range(args.repeats):  # interleaved: a change in the machine's load hits both
                    base_rates.append(imagefolder_baseline(folder, args.batch, workers, args.epochs))
                    for name, uri in cases:
                        cache = Path(tmp) / f"cache-{name.replace(' ', '-')}-{size}-{workers}-{repeat}"
                        cfg = DataConfig(format=name.split()[0], uri=uri, num_workers=workers, shuffle_buffer=256,
                                         cache_dir=str(cache))
                        rates[name].append(sharded(cfg, args.batch, args.epochs))
                base = float(np.median(base_rates))
                print(f"{size:<6}{'ImageFolder + PIL':<26}{workers:>8}{base:>10.0f}{1.0:>16.2f}{'':>13}"
                      f"{base / (3 * need):>15.2f}", flush=True)
                for name, values in rates.items():
                    ratios = np.array(values) / np.array(base_rates)
                    rate = float(np.median(values))
                    print(f"{size:<6}{name:<26}{workers:>8}{rate:>10.0f}{np.median(ratios):>16.2f}"
                          f"{f'{ratios.min():.2f}–{ratios.max():.2f}':>13}{rate / (3 * need):>15.2f}", flush=True)
    server.stop()


if __name__ == "__main__":
    main()
