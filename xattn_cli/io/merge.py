"""Joining the `--out` folders of shard runs (`--shard I/N`) into one, as a single run would have left it.

Each folder contributes the latest record of each (image, model, method). An image that two folders both
explain must have the same results in both: records are compared without their "meta" (timings, device,
versions) and with artifact paths reduced to file names; otherwise the merge fails and writes nothing.
An ok record wins over an error record of the same image (a shard rerun after a failure).

Artifacts (overlays, maps) are hard-linked into the merged folder, or copied where a link cannot be made
(another file system), and the merged records name them there: the merged folder stands alone, works
with `--resume` and `xattn report`, and the shard folders can be deleted. A link is safe because runs
never change a file in place; they replace it by renaming.
"""
from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xattn_cli.errors import UsageError
from xattn_cli.io.outputs import FILE_KEYS, RESULTS_FILE_NAME, RunKey, artifact_relative, atomic_write_bytes, latest_records


@dataclass
class MergeSummary:
    records: int
    failed: int
    folders: int


def merge_outputs(folders: Sequence[str | Path], out: str | Path) -> MergeSummary:
    """Merge the results of `folders` into `out` (which must not hold a results.jsonl yet).

    Raises UsageError, before writing anything, for a folder without results, an ok record whose files
    are missing, or an image with different results in two folders.
    """
    folders, out = [Path(folder) for folder in folders], Path(out)
    if (out / RESULTS_FILE_NAME).exists():
        raise UsageError(f"{out} already holds {RESULTS_FILE_NAME}; merge into a new folder")
    chosen: dict[RunKey, tuple[dict[str, Any], Path]] = {}
    for folder in folders:
        if not (folder / RESULTS_FILE_NAME).is_file():
            raise UsageError(f"{folder}: no {RESULTS_FILE_NAME} (not an --out folder of xattn surgery/relevancy)")
        for key, record in latest_records(folder / RESULTS_FILE_NAME).items():
            _choose(chosen, key, record, folder)
    links = _artifacts(chosen.values(), out)
    out.mkdir(parents=True, exist_ok=True)
    for destination, source in links.items():
        _link_or_copy(source, destination)
    lines = [json.dumps(_relocated(record, out), ensure_ascii=False, allow_nan=False) + "\n"
             for record, _ in chosen.values()]
    atomic_write_bytes(out / RESULTS_FILE_NAME, "".join(lines).encode("utf-8"))
    failed = sum(record.get("status") != "ok" for record, _ in chosen.values())
    return MergeSummary(records=len(chosen), failed=failed, folders=len(folders))


def _choose(chosen: dict[RunKey, tuple[dict[str, Any], Path]], key: RunKey, record: dict[str, Any],
            folder: Path) -> None:
    """Keep the first record of `key`, an ok one over an error one; two ok ones must agree."""
    if key not in chosen:
        chosen[key] = (record, folder)
        return
    kept, kept_folder = chosen[key]
    if record.get("status") != "ok":
        return
    if kept.get("status") != "ok":
        chosen[key] = (record, folder)
    elif _comparable(kept) != _comparable(record):
        raise UsageError(f"{key[0]} has different results in {kept_folder} and {folder} "
                         f"({key[1]} · {key[2]}); not merged")


def _comparable(record: dict[str, Any]) -> dict[str, Any]:
    """A record without its meta, artifact paths reduced to file names."""
    targets = [{key: str(artifact_relative(record, value)) if key in FILE_KEYS and value else value
                for key, value in target.items()} for target in record.get("targets") or []]
    return {**{key: value for key, value in record.items() if key != "meta"}, "targets": targets}


def _artifacts(chosen: Iterable[tuple[dict[str, Any], Path]], out: Path) -> dict[Path, Path]:
    """Merged file → the source file it comes from. Two different files with one name are an error."""
    links: dict[Path, Path] = {}
    for record, folder in chosen:
        if record.get("status") != "ok":
            continue
        for target in record.get("targets") or []:
            for key in FILE_KEYS:
                if not target.get(key):
                    continue
                relative = artifact_relative(record, target[key])
                source = folder / relative
                if not source.is_file():
                    raise UsageError(f"{folder}: {record['image']} names {relative}, which is missing; "
                                     "rerun that shard with --resume first")
                destination = out / relative
                if destination in links and not _same_bytes(links[destination], source):
                    raise UsageError(f"{relative} differs between {links[destination]} and {source}; "
                                     "were the shards run over different inputs?")
                links.setdefault(destination, source)
    return links


def _same_bytes(first: Path, second: Path) -> bool:
    if first.stat().st_size != second.stat().st_size:
        return False
    return first.read_bytes() == second.read_bytes()


def _link_or_copy(source: Path, destination: Path) -> None:
    if destination.exists() and _same_bytes(source, destination):
        return
    destination.parent.mkdir(parents=True, exist_ok=True)  # a tree layout's folders
    temporary = destination.with_name(f".{destination.name}.{secrets.token_hex(4)}.tmp")  # as --resume cleans up
    try:
        os.link(source, temporary)
        os.replace(temporary, destination)
    except OSError:
        temporary.unlink(missing_ok=True)
        atomic_write_bytes(destination, source.read_bytes())


def _relocated(record: dict[str, Any], out: Path) -> dict[str, Any]:
    """The record with its artifacts named inside `out`."""
    if record.get("status") != "ok":
        return record
    targets = [{key: str(out / artifact_relative(record, value)) if key in FILE_KEYS and value else value
                for key, value in target.items()} for target in record.get("targets") or []]
    return {**record, "targets": targets, "meta": {**(record.get("meta") or {}), "out": str(out)}}
