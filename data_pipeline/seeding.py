"""Deterministic seeds for every random choice of the data path (shard order, shuffles, flips)."""

from __future__ import annotations

import hashlib


def derive_seed(stream: str, *parts: int | str) -> int:
    """A 64-bit seed from a stream name and values, free of collisions like (seed=1, epoch=0) vs (0, 1)."""
    text = stream + ":" + ",".join(str(p) for p in parts)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
