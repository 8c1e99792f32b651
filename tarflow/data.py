"""``tarflow data write``: a source (embedded, image folder, npz) as webdataset or MDS shards."""

from __future__ import annotations

import argparse


def parse_size(text: str) -> int:
    """``4000``, ``64MB``, ``1MiB`` → bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    number = text.strip().upper().rstrip("S")
    digits = len(number) - len(number.lstrip("0123456789."))
    value, unit = number[:digits], number[digits:].strip()
    if not value or unit not in units:
        raise argparse.ArgumentTypeError(f"cannot read size {text!r}; e.g. 4000, 64MB, 1MiB")
    return int(float(value) * units[unit])


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="write datasets as shards")
    dsub = p.add_subparsers(dest="data_command", required=True)
    q = dsub.add_parser("write", help="write a source as webdataset or MDS shards with a manifest per split")
    q.add_argument("--source", required=True, help="digits | photos | imagefolder:PATH | npz:PATH")
    q.add_argument("--format", required=True, choices=["webdataset", "mds"])
    q.add_argument("--out", required=True, help="a directory or s3://bucket/prefix")
    q.add_argument("--image-size", type=int, default=0, help="resize the shorter side and centre-crop to this")
    q.add_argument("--shard-size", type=parse_size, default=64 * 2**20, help="bytes per shard, e.g. 64MB")
    q.add_argument("--encoding", default="png", choices=["png", "jpeg", "raw"])
    q.add_argument("--heldout-fraction", type=float, default=0.1)
    q.add_argument("--split-seed", type=int, default=0)
    q.set_defaults(func=write)


def write(args: argparse.Namespace) -> int:
    from data_pipeline.sources import open_source
    from data_pipeline.writer import write_dataset

    source = open_source(args.source, image_size=args.image_size, heldout_fraction=args.heldout_fraction,
                         seed=args.split_seed)
    manifests = write_dataset(source, args.out, args.format, shard_size=args.shard_size, encoding=args.encoding)
    for split, m in manifests.items():
        print(f"{args.out.rstrip('/')}/{split}: {m.num_samples} samples in {len(m.shards)} {m.format} shards, "
              f"images {tuple(m.image_shape)} {m.encoding}, {m.num_classes} classes")
    return 0
