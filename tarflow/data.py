"""``tarflow data write``: a source (embedded, image folder, npz) as webdataset or MDS shards, in parallel, resumable,
and in parts for array jobs."""

from __future__ import annotations

import argparse
import os

WRITE_EPILOG = """\
Worker processes prepare the images (load, resize, encode); the shards are assembled in the source's order, so the
output is the same, byte for byte, for any --workers. A progress bar shows images/s and the ETA (in a log file: one
line a minute).

An interrupted write resumes: run the same command again; shards already finished (listed in
OUT/<split>/write-progress*.json once complete) are kept, the rest is written as an uninterrupted write would.

Across an array job or several nodes (parts counted from 0):
  tarflow data write --source imagefolder:/data/imagenet/train --image-size 64 --format mds \\
      --out s3://bucket/imagenet64 --part $SLURM_ARRAY_TASK_ID/8        # in each of 8 tasks (--array=0-7)
  tarflow data write --source imagefolder:/data/imagenet/train --image-size 64 --format mds \\
      --out s3://bucket/imagenet64 --finalize                           # once all 8 have finished
Part I of N writes every split's samples [I*n/N, (I+1)*n/N) as shards named part-IIIII-of-NNNNN-...; --finalize
checks that every part finished with the same settings and writes the manifests (last): the same samples in the
same order as a write in one go, in shards also cut at part boundaries."""


def parse_size(text: str) -> int:
    """``4000``, ``64MB``, ``1MiB`` → bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    number = text.strip().upper().rstrip("S")
    digits = len(number) - len(number.lstrip("0123456789."))
    value, unit = number[:digits], number[digits:].strip()
    if not value or unit not in units:
        raise argparse.ArgumentTypeError(f"cannot read size {text!r}; e.g. 4000, 64MB, 1MiB")
    return int(float(value) * units[unit])


def usable_cpus() -> int:
    """The CPUs this process may run on (a SLURM or container CPU binding included)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="write datasets as shards")
    dsub = p.add_subparsers(dest="data_command", required=True)
    q = dsub.add_parser("write", help="write a source as webdataset or MDS shards with a manifest per split",
                        epilog=WRITE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("--source", help="digits | photos | imagefolder:PATH | npz:PATH (not needed with --finalize)")
    q.add_argument("--format", required=True, choices=["webdataset", "mds"])
    q.add_argument("--out", required=True, help="a directory or s3://bucket/prefix")
    q.add_argument("--image-size", type=int, default=0,
                   help="resize the shorter side to this, then centre-crop a square (torchvision's Resize + "
                        "CenterCrop, as the official code)")
    q.add_argument("--shard-size", type=parse_size, default=64 * 2**20, help="bytes per shard, e.g. 64MB")
    q.add_argument("--encoding", default="png", choices=["png", "jpeg", "raw"])
    q.add_argument("--heldout-fraction", type=float, default=0.1)
    q.add_argument("--split-seed", type=int, default=0)
    q.add_argument("--workers", type=int, default=usable_cpus(),
                   help="processes preparing images (default: the CPUs this process may use, here %(default)s)")
    q.add_argument("--part", metavar="I/N", help="write only part I of N (from 0) of every split, without manifests;"
                   " then run --finalize")
    q.add_argument("--finalize", action="store_true",
                   help="after every --part I/N has finished: check the parts and write the manifests")
    q.set_defaults(func=write)


def write(args: argparse.Namespace) -> int:
    from data_pipeline.parallel_encode import check_workers
    from data_pipeline.sources import open_source, source_settings
    from data_pipeline.write_record import WritePart
    from data_pipeline.writer import finalize_parts, write_dataset, write_part, write_settings

    where = args.out.rstrip("/")
    if args.finalize:
        if args.part:
            raise ValueError("--finalize puts the parts together: give it without --part")
        settings = None
        if args.source:  # the write's own command line plus --finalize: check that the parts were written with it
            settings = write_settings(source_settings(args.source, image_size=args.image_size,
                                                      heldout_fraction=args.heldout_fraction, seed=args.split_seed),
                                      args.format, args.encoding, args.shard_size)
        _print_manifests(where, finalize_parts(args.out, args.format, settings=settings))
        return 0
    if not args.source:
        raise ValueError("--source is required (only --finalize does without it)")
    part = WritePart.parse(args.part) if args.part else None
    check_workers(args.workers)  # before a large image folder is listed
    source = open_source(args.source, image_size=args.image_size, heldout_fraction=args.heldout_fraction,
                         seed=args.split_seed)
    options = dict(shard_size=args.shard_size, encoding=args.encoding, workers=args.workers, progress=True)
    if part is None:
        _print_manifests(where, write_dataset(source, args.out, args.format, **options))
        return 0
    for split, record in write_part(source, args.out, args.format, part, **options).items():
        print(f"{where}/{split}: part {part} has samples {record.start}:{record.stop} of {record.split_samples} in "
              f"{len(record.shards)} {args.format} shards")
    print(f"when every part of {part.count} has finished: the same command with --finalize instead of --part")
    return 0


def _print_manifests(where: str, manifests) -> None:
    for split, m in manifests.items():
        print(f"{where}/{split}: {m.num_samples} samples in {len(m.shards)} {m.format} shards, "
              f"images {tuple(m.image_shape)} {m.encoding}, {m.num_classes} classes")
