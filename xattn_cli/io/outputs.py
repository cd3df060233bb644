"""Output artifacts: atomic file writes, safe file names, and the results.jsonl manifest used by --resume.

A killed run must never leave a half-written PNG/NPY that --resume would trust, nor names that escape
the output folder or overwrite another image's files.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Iterator

import numpy as np
from PIL import Image

RESULTS_FILE_NAME = "results.jsonl"
RUN_LOCK_NAME = ".xattn-run.lock"
"""Each open ResultsLog holds a shared flock on this file of its folder, so a run can tell it is not alone."""
FILE_KEYS = ("overlay", "map")
"""Keys of a target entry that name an artifact file; --resume requires all present ones to exist."""

_NOT_ALPHANUMERIC = re.compile(r"[\W_]+")
_UNFINISHED_WRITE = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")
"""The temporary of an `_atomic_write` that a killed run never renamed into place."""
_EXTENSION = re.compile(r"[a-z0-9]+")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one, never a part."""
    _atomic_write(path, lambda file: file.write(data))


def atomic_save_npy(path: str | Path, array: np.ndarray) -> None:
    """Save `array` as a .npy file at exactly `path` (no extension added), atomically."""
    _atomic_write(path, lambda file: np.save(file, np.asarray(array), allow_pickle=False))


def atomic_save_png(path: str | Path, image: Image.Image) -> None:
    """Save `image` as a PNG at `path`, atomically."""
    _atomic_write(path, lambda file: image.save(file, format="PNG"))


Z_RLE = 3  # zlib's run-length strategy
OVERLAY_ENCODINGS = {"png": ("PNG", {"compress_level": 1, "compress_type": Z_RLE}), "jpg": ("JPEG", {"quality": 90})}
"""Overlay file kind → PIL format and options. PNG level 1: a 224 px overlay encodes in about a third of
the time of the default level 6 for a file about 1.4× larger; zlib's run-length strategy then takes 30 %
less time again and makes the file 15 % smaller (heatmap overlays are long runs; measured in issue 18)."""


def atomic_save_overlay(path: str | Path, image: Image.Image, kind: str) -> None:
    """Save an RGB overlay as `kind` ("png" or "jpg", see OVERLAY_ENCODINGS) at `path`, atomically."""
    image_format, options = OVERLAY_ENCODINGS[kind]
    _atomic_write(path, lambda file: image.save(file, format=image_format, **options))


def _atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Write through a hidden temporary file in the same folder, fsync it, then rename it into place.

    The temporary file is removed if anything fails. It is created with `open(..., "xb")` rather than
    `mkstemp` so the final file gets the usual umask permissions instead of 0600.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")  # the form _UNFINISHED_WRITE matches
    try:
        with open(temporary, "xb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def slugify(text: str, max_len: int = 60) -> str:
    """A file-name-safe form of `text`: lower-case letters and digits (Unicode ones kept) joined by "-".

    Never empty (falls back to "target") and never contains "/", "\\", "." or "_", so it cannot escape a
    folder and cannot contain the "__" that separates image stem from target in artifact names.
    """
    normalised = unicodedata.normalize("NFKC", text).casefold()
    slug = _NOT_ALPHANUMERIC.sub("-", normalised).strip("-")
    slug = slug[:max_len].rstrip("-")
    return slug or "target"


def _short_hash(text: str) -> str:
    """Six hex digits of sha1(text): enough to tell colliding names apart, short enough to read."""
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:6]


LAYOUTS = ("flat", "tree")
"""Where artifacts go: all directly in --out, or in folders mirroring the inputs' folders below their common
folder (so no folder of a large run holds millions of files). File names are the same in both."""


class OutputNamer:
    """Unique, stable artifact names for the images of one run.

    Each image's stem is the slug of its file stem; images whose slugs collide (same name in two
    folders, "Dog.png" vs "dog.jpg") all get `-<sha1 of absolute path>` appended, so names do not depend
    on input order. Targets whose slugs collide within one image ("a dog" vs "a-dog") get the same kind
    of suffix on the later one. With `layout="tree"` each file goes into its image's folder relative to the
    common folder of all images.
    """

    def __init__(self, image_paths: Sequence[str | Path], layout: str = "flat") -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r} ({' or '.join(LAYOUTS)})")
        keys = list(dict.fromkeys(os.path.abspath(path) for path in image_paths))
        slugs = {key: slugify(Path(key).stem) for key in keys}
        counts = Counter(slugs.values())
        self._stems = {
            key: f"{slug}-{_short_hash(key)}" if counts[slug] > 1 else slug for key, slug in slugs.items()
        }
        root = os.path.commonpath([os.path.dirname(key) for key in keys]) if layout == "tree" and keys else None
        self._folders = {key: Path(os.path.relpath(os.path.dirname(key), root)) if root else Path(".")
                         for key in keys}
        self._target_by_slug: dict[tuple[str, str], str] = {}

    def stem(self, image_path: str | Path) -> str:
        """The unique stem of an image of this run; KeyError for an image the namer was not given."""
        key = os.path.abspath(image_path)
        if key not in self._stems:
            raise KeyError(f"{image_path} is not one of this run's images")
        return self._stems[key]

    def artifact_path(self, out_dir: str | Path, image_path: str | Path, target: str, ext: str,
                      run: str = "") -> Path:
        """`<out_dir>/[<folder>/]<stem>__<run-slug>__<target-slug>.<ext>` (without `run`:
        `<stem>__<target-slug>.<ext>`), guaranteed to lie inside `out_dir` (directly, in the flat layout).
        `run` names what made the file (model and method), so runs of several models or methods can share a
        folder without overwriting each other's files."""
        if not _EXTENSION.fullmatch(ext):
            raise ValueError(f"invalid artifact extension {ext!r}")
        stem = self.stem(image_path)
        out_dir = Path(out_dir)
        made_by = f"{slugify(run, 40)}__" if run else ""
        folder = out_dir / self._folders[os.path.abspath(image_path)]
        path = folder / f"{stem}__{made_by}{self._target_slug(stem, target)}.{ext}"
        if path.resolve().parent != folder.resolve() or not folder.resolve().is_relative_to(out_dir.resolve()):
            raise ValueError(f"artifact name {path.name!r} escapes the output folder {out_dir}")
        return path

    def _target_slug(self, stem: str, target: str) -> str:
        """The target's slug, suffixed with its hash when another target of the image took the slug."""
        slug = slugify(target)
        owner = self._target_by_slug.setdefault((stem, slug), target)
        if owner == target:
            return slug
        unique = f"{slug}-{_short_hash(target)}"
        self._target_by_slug.setdefault((stem, unique), target)
        return unique


def to_jsonable(value: Any) -> Any:
    """`value` with numpy scalars/arrays, tuples and paths turned into plain JSON types, recursively.

    Non-finite floats are left as they are, so `ResultsLog.append` rejects them loudly.
    """
    if isinstance(value, dict):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(item) for item in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


class ResultsLog:
    """The `<out_dir>/results.jsonl` manifest: one JSON record per finished image, durable per line.

    Use as a context manager. Records are appended (a batch of them at a time) and fsynced under an exclusive
    `flock`, so several runs can share one `out_dir` and a killed run loses at most the lines being written. Such a
    cut-off line is skipped when the log is read back and truncated away when the log is next opened.
    """

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / RESULTS_FILE_NAME
        self._run_lock = open(self.out_dir / RUN_LOCK_NAME, "ab")
        fcntl.flock(self._run_lock.fileno(), fcntl.LOCK_SH)
        self._file = open(self.path, "ab+", buffering=0)  # unbuffered: each line is written whole, under the lock
        with self._locked():
            self._drop_partial_line()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """An exclusive lock on the manifest, so runs sharing `out_dir` never interleave or cut lines."""
        fcntl.flock(self._file.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)

    def _drop_partial_line(self) -> int:
        """Truncate a last line cut off by a kill or a full disk (here or in another run sharing the folder),
        so the file holds only whole lines; its size after. Call under the lock."""
        descriptor = self._file.fileno()
        size = os.fstat(descriptor).st_size
        if size == 0 or os.pread(descriptor, 1, size - 1) == b"\n":
            return size
        start = size
        while start > 0:  # look back for the last newline, a block at a time
            start = max(0, start - 65536)
            newline = os.pread(descriptor, size - start, start).rfind(b"\n")
            if newline >= 0:
                break
        whole = start + newline + 1  # 0 when there is no newline at all
        os.ftruncate(descriptor, whole)
        os.fsync(descriptor)
        return whole

    def append(self, record: dict[str, Any]) -> None:
        """Append one record as a JSON line and make it durable before returning."""
        self.extend([record])

    def extend(self, records: Sequence[dict[str, Any]]) -> None:
        """Append records as JSON lines with one write and one fsync, durable before returning. A write that
        fails (a full disk) is cut back off, so the manifest never keeps part of a line."""
        if not records:
            return
        data = "".join(json.dumps(to_jsonable(record), ensure_ascii=False, allow_nan=False) + "\n"
                       for record in records).encode("utf-8")
        descriptor = self._file.fileno()
        with self._locked():
            size = self._drop_partial_line()
            try:
                written = 0
                while written < len(data):  # O_APPEND: each write lands at the end
                    written += os.write(descriptor, data[written:])
                os.fsync(descriptor)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.ftruncate(descriptor, size)
                raise

    def remove_unfinished_writes(self) -> int:
        """Delete the hidden temporaries that writes cut short by a kill left in `out_dir`; how many.

        None while another run has the folder open: its temporaries may be writes still under way."""
        try:
            fcntl.flock(self._run_lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # only when alone
        except BlockingIOError:
            fcntl.flock(self._run_lock.fileno(), fcntl.LOCK_SH)  # a failed conversion may have dropped it
            return 0
        try:
            unfinished = [Path(folder, name) for folder, _, names in os.walk(self.out_dir)  # tree layouts too
                          for name in names if _UNFINISHED_WRITE.fullmatch(name)]
            for path in unfinished:
                path.unlink(missing_ok=True)
        finally:
            fcntl.flock(self._run_lock.fileno(), fcntl.LOCK_SH)
        return len(unfinished)

    def done_items(self, model: str | None = None, method: str | None = None) -> set[str]:
        """Images whose latest record (of `model` and `method`, when given) is "ok" and whose overlay/map
        files all still exist (for --resume): another model's or method's results never count as done.

        Artifact files are looked up by name inside `out_dir`, where they always live, so the answer
        does not depend on the working directory the earlier run used.
        """
        return {image for (image, made_by, how), record in latest_records(self.path).items()
                if (model is None or made_by == model) and (method is None or how == method)
                and self._is_complete(record)}

    def _is_complete(self, record: dict[str, Any]) -> bool:
        """Whether a record is "ok" and every artifact it names exists."""
        if record.get("status") != "ok":
            return False
        targets = record.get("targets") or []
        if not all(isinstance(target, dict) for target in targets):
            return False
        named = [target[key] for target in targets for key in FILE_KEYS if target.get(key)]
        return all(artifact_in(self.out_dir, record, name).is_file() for name in named)

    def close(self) -> None:
        """Close the log file (and give up its share of the folder)."""
        self._file.close()
        self._run_lock.close()

    def __enter__(self) -> ResultsLog:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


RunKey = tuple[str, Any, Any]
"""(image, model, method): what a record is of. Runs of several models or methods can share one folder."""


def latest_records(path: str | Path) -> dict[RunKey, dict[str, Any]]:
    """The last record of each (image, model, method) in a results.jsonl file, in first-seen order: a resumed
    or retried image keeps its latest record (truncated lines skipped)."""
    return {(record["image"], record.get("model"), record.get("method")): record for record in read_records(path)}


def read_records(path: str | Path) -> Iterator[dict[str, Any]]:
    """Every record of a results.jsonl file, in file order (truncated and foreign lines skipped)."""
    with open(path, encoding="utf-8", errors="replace") as file:
        for line in file:
            record = _parse_record(line)
            if record is not None:
                yield record


def artifact_in(out_dir: str | Path, record: dict[str, Any], recorded: object) -> Path:
    """Where an artifact that `record` names (as the run saw it, relative to its working directory) lies now,
    with the run's folder at `out_dir`."""
    return Path(out_dir) / artifact_relative(record, recorded)


def artifact_relative(record: dict[str, Any], recorded: object) -> Path:
    """An artifact's path inside its run's --out: relative to the --out its record's meta names (either
    layout), else its file name (records of runs before layouts existed, which were all flat)."""
    run_out = (record.get("meta") or {}).get("out")
    if isinstance(run_out, str):
        relative = Path(os.path.relpath(str(recorded), run_out))
        if ".." not in relative.parts:
            return relative
    return Path(Path(str(recorded)).name)


def _parse_record(line: str) -> dict[str, Any] | None:
    """A record with a string "image" from one log line, or None for blank, truncated or foreign lines."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if isinstance(record, dict) and isinstance(record.get("image"), str):
        return record
    return None
