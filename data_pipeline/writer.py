"""Writing a source as shards: webdataset tar files or MDS (streaming's format), plus a manifest per split; in
parallel, resumable, and split into parts that separate tasks or nodes write.

Layout under OUT (a directory or ``s3://bucket/prefix``)::

    OUT/train/shard-000000.tar …  OUT/train/manifest.json        (webdataset)
    OUT/train/shard.00000.mds …   OUT/train/index.json  OUT/train/manifest.json   (mds)
    OUT/train/write-progress.json                                 (what the write finished: see write_record)
    OUT/heldout/…

- Parallel (``workers``): worker processes load, resize and encode samples (``parallel_encode``); this process
  assembles the shards from them in the source's order, so shard boundaries and bytes do not depend on the number of
  workers.
- Each shard is built in memory and published whole (``split_output``); the manifest (and MDS's index.json) goes
  last, so a reader that finds a manifest finds every shard it lists.
- Resumable: a shard is added to the split's write-progress record once published; a write that finds a record of
  the same settings keeps the shards it lists (when present with their size) and continues after them. Where a
  resumed write starts was a shard boundary of the interrupted one, so the result equals an uninterrupted write.
- Parts (``write_part``): part I of N writes positions [I·n/N, (I+1)·n/N) of every split as shards named
  ``part-IIIII-of-NNNNN-…`` and its own record, no manifest; ``finalize_parts`` checks that every part has finished
  and writes the manifests, listing the parts' shards in part order. The samples, their order and their bytes are
  those of a write in one go; the shards are cut at part boundaries too, so their number, names and files differ.
"""

from __future__ import annotations

import hashlib

from .codecs import ENCODINGS
from .manifest import MANIFEST_NAME, Manifest
from .parallel_encode import SampleEncoder, check_workers
from .resumable import SPLITS
from .shard_formats import SHARD_FORMATS, ShardFormat
from .sources import Source
from .split_output import SplitOutput
from .storage import DataSourceError
from .write_progress import WriteProgress
from .write_record import (
    WHOLE_RECORD,
    WritePart,
    WriteRecord,
    WrittenShard,
    differences,
    is_record,
    part_of_record,
    record_name,
    shard_prefix,
)

FORMATS = tuple(SHARD_FORMATS)


def write_settings(source_settings: dict, fmt: str, encoding: str, shard_size: int) -> dict:
    """Everything that decides a write's bytes besides the images themselves: parts and resumptions must share it."""
    return {"source": dict(source_settings), "format": fmt, "encoding": encoding, "shard_size": int(shard_size)}


def write_dataset(source: Source, out: str, fmt: str, *, shard_size: int = 64 << 20, encoding: str = "png",
                  workers: int = 1, progress: bool = False) -> dict[str, Manifest]:
    """Write every split of ``source`` in one go (resuming an interrupted write of the same settings) and its
    manifests."""
    records = _write(source, out, fmt, None, shard_size, encoding, workers, progress)
    return {split: _publish(SplitOutput(out, split), [record]) for split, record in records.items()}


def write_part(source: Source, out: str, fmt: str, part: WritePart, *, shard_size: int = 64 << 20,
               encoding: str = "png", workers: int = 1, progress: bool = False) -> dict[str, WriteRecord]:
    """Write part ``part`` of every split (resuming it if interrupted), without manifests: ``finalize_parts``
    writes them once every part has finished."""
    return _write(source, out, fmt, part, shard_size, encoding, workers, progress)


def finalize_parts(out: str, fmt: str, *, settings: dict | None = None) -> dict[str, Manifest]:
    """The manifests of a write done in parts, after checking that every part of every split has finished with the
    same settings (``settings``, when given, too) and that their shards are present."""
    plans = {split: _finished_parts(SplitOutput(out, split), fmt, settings) for split in SPLITS}
    return {split: _publish(SplitOutput(out, split), records) for split, records in plans.items()}


def _check_options(fmt: str, encoding: str, shard_size: int, workers: int) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown --format {fmt!r}; choose one of {FORMATS}")
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown --encoding {encoding!r}; choose one of {ENCODINGS}")
    if shard_size < 1024:
        raise ValueError(f"--shard-size must be at least 1024 bytes, got {shard_size}")
    check_workers(workers)


def _write(source, out, fmt, part, shard_size, encoding, workers, progress) -> dict[str, WriteRecord]:
    _check_options(fmt, encoding, shard_size, workers)
    settings = write_settings(source.settings or {"spec": source.name}, fmt, encoding, shard_size)
    outputs = {split: SplitOutput(out, split) for split in source.splits}
    # Every split's record is read and checked before anything is written.
    records = {split: _start_record(outputs[split], source, split, part, settings) for split in source.splits}
    total = sum(r.stop - r.start for r in records.values())
    done = sum(r.next_position - r.start for r in records.values())
    shard_format = SHARD_FORMATS[fmt](shard_size, encoding)
    try:
        with SampleEncoder(source, encoding, workers) as encoder:  # workers fork before the bar starts a thread
            bar = WriteProgress(total, done, enabled=progress)
            try:
                for split, record in records.items():
                    bar.describe(split if part is None else f"{split} part {part}")
                    _write_shards(record, outputs[split], shard_format, encoder, bar, part)
            finally:
                bar.close()
    finally:
        shard_format.close()
    return records


def _start_record(output: SplitOutput, source: Source, split: str, part: WritePart | None,
                  settings: dict) -> WriteRecord:
    """The record this write continues (its shards that are present with their size), or a new one."""
    listing = output.sizes()
    records = [name for name in listing if is_record(name)]
    if part is None and any(part_of_record(n) for n in records):
        count = next(part_of_record(n) for n in records if part_of_record(n)).count
        raise ValueError(f"{output.uri} holds parts of a write in {count} parts; finish them (--part I/{count}) and "
                         f"run with --finalize, or delete {output.uri} to write it in one go")
    if part is not None and WHOLE_RECORD in records:
        raise ValueError(f"{output.uri} holds a write in one go ({WHOLE_RECORD}); rerun it without --part to "
                         f"continue it, or delete {output.uri} to write it in parts")
    counts = {part_of_record(n).count for n in records if part_of_record(n)} - {part.count if part else 0}
    if part is not None and counts:
        raise ValueError(f"{output.uri} holds parts of a write in {sorted(counts)[0]} parts, not {part.count}; use "
                         f"the same number of parts, or delete {output.uri} to start over")
    n = source.counts[split]
    start, stop = (0, n) if part is None else part.sample_range(n)
    fresh = WriteRecord(settings, split, n, None if part is None else [part.index, part.count], start, stop,
                        source.name, source.num_classes, list(source.image_shape))
    name = record_name(part)
    temporary = (shard_prefix(part) or "shard", name) + ((MANIFEST_NAME, *_index_names(settings)) if part is None
                                                         else ())
    output.remove_temporary(temporary)
    if name not in listing:
        # A new write: a manifest already there describes other shards, and must not outlive them.
        for published in (MANIFEST_NAME, *_index_names(settings)):
            if published in listing:
                output.delete(published)
        return fresh
    record = WriteRecord.from_json(output.read(name), output.where(name))
    changed = differences(record.identity(), fresh.identity())
    if changed:
        raise ValueError(f"{output.where(name)} records a write with other settings ({'; '.join(changed)}); rerun "
                         f"with the settings it records to continue it, or delete {output.uri} to start over")
    kept = []
    for shard in record.shards:  # a shard missing or of another size is rewritten, and every shard after it
        if listing.get(shard.name) != shard.bytes:
            break
        kept.append(shard)
    if len(kept) < len(record.shards):
        record.shards, record.complete = kept, False
    return record


def _index_names(settings: dict) -> tuple[str, ...]:
    return tuple(SHARD_FORMATS[settings["format"]].index_files([]))


def _write_shards(record: WriteRecord, output: SplitOutput, shard_format: ShardFormat, encoder: SampleEncoder,
                  bar: WriteProgress, part: WritePart | None) -> None:
    if record.complete:
        return
    prefix, name = shard_prefix(part), record_name(part)
    pending, counted = [], shard_format.empty_shard_bytes

    def publish():
        data = shard_format.shard_bytes(pending)
        shard_name = shard_format.shard_name(prefix, len(record.shards))
        output.put(shard_name, data)
        record.shards.append(WrittenShard(shard_name, len(pending), len(data), hashlib.sha256(data).hexdigest(),
                                          shard_format.index_entry(shard_name, data, len(pending))))
        output.put(name, record.to_json().encode())  # only now is the shard finished

    start = record.next_position
    written = 0
    for key, image, label in encoder.encoded(record.split, start, record.stop):
        sample = shard_format.record(key, image, label)
        if shard_format.full(counted, len(pending), sample):
            publish()
            pending, counted = [], shard_format.empty_shard_bytes
        pending.append(sample)
        counted += shard_format.record_bytes(sample)
        written += 1
        bar.update(1)
    if pending:
        publish()
    if start + written != record.stop:
        raise ValueError(f"source {record.source} gave {start + written - record.start} samples of split "
                         f"{record.split} for positions {record.start}:{record.stop}; its counts are wrong")
    record.complete = True
    output.put(name, record.to_json().encode())


def _finished_parts(output: SplitOutput, fmt: str, settings: dict | None) -> list[WriteRecord]:
    """The records of every part of a split, in part order, checked to be finished and to fit together."""
    listing = output.sizes()
    names = {part_of_record(n): n for n in listing if part_of_record(n)}
    if not names:
        alone = " (it was written in one go, which writes its own manifest)" if WHOLE_RECORD in listing else ""
        raise ValueError(f"{output.uri} holds no parts to finalize (no write-progress.part-*.json){alone}; write "
                         f"them with --part I/N first")
    counts = sorted({p.count for p in names})
    if len(counts) > 1:
        raise ValueError(f"{output.uri} holds parts of writes in {counts} parts; delete the parts of the write you "
                         f"do not want")
    parts = [WritePart(i, counts[0]) for i in range(counts[0])]
    missing = [str(p.index) for p in parts if p not in names]
    if missing:
        listed = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise ValueError(f"{output.uri}: part(s) {listed} of {counts[0]} have not been written; run them with "
                         f"--part I/{counts[0]}")
    records = [WriteRecord.from_json(output.read(names[p]), output.where(names[p])) for p in parts]
    reference = records[0].identity()
    shared = ("settings", "split_samples", "source", "num_classes", "image_shape")
    for part, record in zip(parts, records):
        where = output.where(names[part])
        if record.settings["format"] != fmt:
            raise ValueError(f"{where} is a {record.settings['format']} write, not {fmt}; finalize it with "
                             f"--format {record.settings['format']}")
        changed = differences({k: reference[k] for k in shared}, {k: record.identity()[k] for k in shared})
        if changed:
            raise ValueError(f"{where} was written with other settings than part 0 ({'; '.join(changed)}); rewrite "
                             f"that part with the settings of the others")
        if not record.complete:
            done, size = record.next_position - record.start, record.stop - record.start
            raise ValueError(f"part {part} of {output.uri} is not finished ({done} of {size} samples); rerun it with "
                             f"--part {part} (it resumes)")
    changed = differences(reference["settings"], settings) if settings is not None else []
    if changed:
        raise ValueError(f"the parts of {output.uri} were written with other settings than this command's "
                         f"({'; '.join(changed)}: parts -> command); give --finalize the options of the parts' "
                         f"command, or no --source to take the parts' settings")
    return records


def _publish(output: SplitOutput, records: list[WriteRecord]) -> Manifest:
    """The split's index (MDS) and then its manifest, after checking that every shard the records list is there."""
    shards = [shard for record in records for shard in record.shards]
    present = output.sizes()
    wrong = [s for s in shards if present.get(s.name) != s.bytes]
    if wrong:
        raise DataSourceError(f"{len(wrong)} shard(s) of {output.uri} are missing or of another size than written "
                              f"(first: {output.where(wrong[0].name)}, {present.get(wrong[0].name)} bytes, written "
                              f"{wrong[0].bytes}); rerun the write (it rewrites them)")
    first = records[0]
    fmt = first.settings["format"]
    for name, text in SHARD_FORMATS[fmt].index_files([s.index_entry for s in shards]).items():
        output.put(name, text.encode())
    manifest = Manifest(format=fmt, split=first.split, num_samples=sum(s.num_samples for s in shards),
                        num_classes=first.num_classes, image_shape=list(first.image_shape),
                        encoding=first.settings["encoding"], source=first.source, shards=[s.info() for s in shards])
    output.put(MANIFEST_NAME, manifest.to_json().encode())  # last
    return manifest
