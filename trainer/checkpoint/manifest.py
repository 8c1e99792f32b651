"""The manifest: written last, after every rank confirmed its upload, it is what makes a checkpoint real.

A checkpoint is the prefix ``step-NNNNNNNN/`` of a store. Readers trust only prefixes holding ``manifest.json``, and
trust each file only at the size and sha256 the manifest lists.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field

from .files import CheckpointError

MANIFEST = "manifest.json"
RUN_FILE = "run_state.pt"  # in every checkpoint, from rank 0: run state and the resolved config
MANIFEST_VERSION = 2
_STEP = re.compile(r"step-(\d{8})")


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def parse_step(name: str) -> int | None:
    """``step-00000010`` → 10; anything else → None."""
    m = _STEP.fullmatch(name)
    return int(m.group(1)) if m else None


def split_checkpoint_uri(uri: str) -> tuple[str, int | None]:
    """``…/root/step-00000010`` → (``…/root``, 10); a root alone → (root, None)."""
    parent, _, name = uri.rstrip("/").rpartition("/")
    step = parse_step(name)
    return ((parent or "."), step) if step is not None else (uri, None)


@dataclass
class Manifest:
    step: int
    strategy: str           # the train.strategy that wrote it
    checkpoint_format: str  # torch | dcp | deepspeed: which strategies can load it
    world_size: int
    config_hash: str
    files: dict[str, dict] = field(default_factory=dict)  # key under the step prefix → {"size", "sha256"}
    weight_average: bool = False  # the strategy's files hold a train.ema average too (absent in older manifests)
    created: float = field(default_factory=time.time)
    version: int = MANIFEST_VERSION

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> "Manifest":
        try:
            raw = json.loads(data)
            manifest = cls(**raw)
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{where} is not a readable checkpoint manifest: {e}") from None
        if manifest.version != MANIFEST_VERSION:
            raise CheckpointError(f"{where} has manifest version {manifest.version}; this code reads "
                                  f"{MANIFEST_VERSION}")
        return manifest
