"""`--shard I/N`: a deterministic partition of a run's inputs, so N processes cover disjoint sets.

An input belongs to shard `int(sha1(path), 16) % N`, the sha1 of its UTF-8 path string exactly as the
input list gives it (before any normalisation), so every process handed the same arguments — an array
job, N machines, one worker per GPU — agrees on the split without talking to the others.
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

from xattn_cli.errors import UsageError

_SHARD = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")


def parse_shard(text: str) -> tuple[int, int]:
    """'2/8' → (2, 8): shard index (0-based) and count. UsageError for anything else."""
    match = _SHARD.fullmatch(text)
    if match is None:
        raise UsageError(f"bad --shard {text!r}: use I/N, e.g. 0/4 (shards 0..N-1 of N)")
    index, count = int(match[1]), int(match[2])
    if count < 1 or index >= count:
        raise UsageError(f"bad --shard {text!r}: I must be in 0..N-1 and N at least 1")
    return index, count


def shard_of(path: str, count: int) -> int:
    """The shard (0..count-1) an input path belongs to."""
    digest = hashlib.sha1(path.encode("utf-8", "surrogatepass")).hexdigest()
    return int(digest, 16) % count


def in_shard(paths: Sequence[str], index: int, count: int) -> list[str]:
    """The paths of shard `index` of `count`, in their order."""
    return [path for path in paths if shard_of(path, count) == index]
