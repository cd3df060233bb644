"""Expansion of the IMAGES arguments (files, folders, globs, `-` for stdin) into one ordered path list.

Explicit paths are kept even when missing or oddly named: they must surface as per-item error records,
never vanish silently.
"""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Iterator, Sequence
from typing import TextIO

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
"""File extensions (lower-case, compared case-insensitively) taken from folders; explicit files need none."""

STDIN_SPEC = "-"
_GLOB_CHARACTERS = frozenset("*?[")


def expand_inputs(specs: Sequence[str], stdin: TextIO | None = None) -> list[str]:
    """Expand IMAGES specs into paths, in order, each path once (first occurrence wins).

    A spec is an existing path (a folder is searched recursively for image extensions, sorted), a glob
    (sorted matches, each treated like a path given by hand; no match keeps the literal), `-` (one path
    per line of `stdin`, default `sys.stdin`, blank lines skipped, not expanded further) or any other
    string, kept as is. Raises ValueError when nothing results, which the CLI reports as a usage error.
    """
    seen: set[str] = set()
    paths: list[str] = []
    for path in _expand_all(specs, stdin if stdin is not None else sys.stdin):
        key = os.path.abspath(path)
        if key not in seen:
            seen.add(key)
            paths.append(path)
    if not paths:
        raise ValueError(f"no input images found in: {' '.join(specs) or '(no arguments)'}")
    return paths


def is_image_file_name(name: str) -> bool:
    """Whether a file name has one of the IMAGE_EXTENSIONS, in any letter case."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _expand_all(specs: Sequence[str], stdin: TextIO) -> Iterator[str]:
    """Every path of every spec, in order, duplicates included."""
    for spec in specs:
        if spec == STDIN_SPEC:
            yield from _read_path_list(stdin)
        elif not os.path.lexists(spec) and _GLOB_CHARACTERS.intersection(spec):
            matches = sorted(glob.glob(spec, recursive=True))
            for match in matches or [spec]:
                yield from _expand_path(match)
        else:
            yield from _expand_path(spec)


def _read_path_list(stdin: TextIO) -> Iterator[str]:
    """Paths from newline-separated text, exactly as written apart from the line ending."""
    for line in stdin:
        path = line.rstrip("\r\n")
        if path.strip():
            yield path


def _expand_path(path: str) -> list[str]:
    """A folder's image files, or the path itself (file, missing or not, or anything else)."""
    return _images_under(path) if os.path.isdir(path) else [path]


def _images_under(folder: str) -> list[str]:
    """Image files below `folder`, recursively and sorted; symlinked folders are followed once each,
    so a symlink loop cannot make the walk endless."""
    visited: set[str] = set()
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:
            dirnames.clear()
            continue
        visited.add(real)
        dirnames.sort()  # which of two routes to one folder wins must not depend on directory order
        found.extend(os.path.join(dirpath, name) for name in filenames if is_image_file_name(name))
    return sorted(found)
