"""What a write has finished, kept beside a split's shards, so that an interrupted write resumes without rewriting
finished shards and the parts of a write split over N tasks can be put together into one manifest.

``OUT/<split>/write-progress.json`` (a write in one go) or ``write-progress.part-IIIII-of-NNNNN.json`` (part I of
N, ``--part I/N``) lists the shards written so far, each added only once the shard is published under its final name
(see ``split_output``) with its size and sha256 known; a resumed write keeps the listed shards that are present with
their listed size, and continues at the first sample after them. The record also holds the write's settings
(source, image size, split, format, encoding, shard size): a write with other settings refuses to continue it.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import asdict, dataclass, field

from .manifest import ShardInfo

RECORD_VERSION = 1
WHOLE_RECORD = "write-progress.json"
_PART_RECORD = re.compile(r"write-progress\.part-(\d{5})-of-(\d{5})\.json")


@dataclass(frozen=True)
class WritePart:
    """Part ``index`` (from 0) of ``count``: positions ``[index·n/count, (index+1)·n/count)`` of every split."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> "WritePart":
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not match or not int(match[1]) < int(match[2]) <= 99999:
            raise ValueError(f"--part {text!r}: expected I/N with 0 <= I < N <= 99999, parts counted from 0 (e.g. "
                             f"--part $SLURM_ARRAY_TASK_ID/8 in an array job of 8 tasks, --array=0-7)")
        return cls(int(match[1]), int(match[2]))

    @property
    def label(self) -> str:
        return f"part-{self.index:05d}-of-{self.count:05d}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def sample_range(self, num_samples: int) -> tuple[int, int]:
        return self.index * num_samples // self.count, (self.index + 1) * num_samples // self.count


def record_name(part: WritePart | None) -> str:
    return WHOLE_RECORD if part is None else f"write-progress.{part.label}.json"


def shard_prefix(part: WritePart | None) -> str:
    """Parts name their shards ``part-IIIII-of-NNNNN-…``, so that no two parts write the same file."""
    return "" if part is None else f"{part.label}-"


def part_of_record(name: str) -> WritePart | None:
    """The part a record file name belongs to (None for a write in one go or a file that is no record)."""
    match = _PART_RECORD.fullmatch(name)
    return WritePart(int(match[1]), int(match[2])) if match else None


def is_record(name: str) -> bool:
    return name == WHOLE_RECORD or part_of_record(name) is not None


@dataclass
class WrittenShard:
    name: str
    num_samples: int
    bytes: int
    sha256: str
    index_entry: dict | None = None  # MDS: its entry of index.json

    def info(self) -> ShardInfo:
        return ShardInfo(self.name, self.num_samples, self.bytes, self.sha256)

    @functools.cached_property
    def json(self) -> str:
        return json.dumps(asdict(self))


@dataclass
class WriteRecord:
    settings: dict            # source settings, format, encoding, shard size: must match to continue
    split: str
    split_samples: int        # samples in the whole split (every part records the same)
    part: list[int] | None    # [index, count], or None for a write in one go
    start: int                # positions start:stop of the split are this record's
    stop: int
    source: str
    num_classes: int
    image_shape: list[int]
    shards: list[WrittenShard] = field(default_factory=list)
    complete: bool = False
    version: int = RECORD_VERSION

    @property
    def next_position(self) -> int:
        return self.start + sum(s.num_samples for s in self.shards)

    def identity(self) -> dict:
        """What another write must share to continue this one."""
        return {"settings": self.settings, "split": self.split, "split_samples": self.split_samples,
                "part": self.part, "start": self.start, "stop": self.stop, "source": self.source,
                "num_classes": self.num_classes, "image_shape": list(self.image_shape)}

    def to_json(self) -> str:
        # Rewritten after every shard: each shard's text is made once, so a record of many shards stays cheap.
        head = json.dumps({k: v for k, v in vars(self).items() if k != "shards"})
        return head[:-1] + ', "shards": [' + ", ".join(s.json for s in self.shards) + "]}\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> "WriteRecord":
        try:
            data = json.loads(text)
            shards = [WrittenShard(**s) for s in data.pop("shards")]
            record = cls(**data, shards=shards)
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"{where} is not a write-progress record ({type(e).__name__}: {e}); delete it to "
                             f"rewrite that part of the split from the start") from None
        if record.version != RECORD_VERSION:
            raise ValueError(f"{where} has record version {record.version}; this writer knows {RECORD_VERSION}")
        return record


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every leaf that differs between two identities."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out
