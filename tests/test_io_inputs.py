"""expand_inputs: folders, globs and stdin lists become one ordered, duplicate-free path list."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from xattn_cli.io.inputs import expand_inputs


def _touch(*paths: Path) -> None:
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


def test_folder_is_recursive_sorted_and_images_only(tmp_path: Path) -> None:
    _touch(tmp_path / "b.PNG", tmp_path / "a.jpg", tmp_path / "sub" / "c.webp", tmp_path / "notes.txt")
    assert expand_inputs([str(tmp_path)]) == [
        str(tmp_path / "a.jpg"),
        str(tmp_path / "b.PNG"),
        str(tmp_path / "sub" / "c.webp"),
    ]


def test_explicit_files_are_kept_even_if_missing_or_not_images(tmp_path: Path) -> None:
    _touch(tmp_path / "notes.txt")
    specs = [str(tmp_path / "missing.png"), str(tmp_path / "notes.txt")]
    assert expand_inputs(specs) == specs


def test_glob_sorted_recursive_and_unmatched_kept(tmp_path: Path) -> None:
    _touch(tmp_path / "z.png", tmp_path / "a.png", tmp_path / "deep" / "er" / "m.png", tmp_path / "x.jpg")
    unmatched = str(tmp_path / "*.gif")
    result = expand_inputs([str(tmp_path / "**" / "*.png"), unmatched])
    assert result == [
        str(tmp_path / "a.png"),
        str(tmp_path / "deep" / "er" / "m.png"),
        str(tmp_path / "z.png"),
        unmatched,
    ]


def test_glob_matching_a_folder_expands_it(tmp_path: Path) -> None:
    _touch(tmp_path / "set1" / "a.png", tmp_path / "set1" / "readme.md")
    assert expand_inputs([str(tmp_path / "set*")]) == [str(tmp_path / "set1" / "a.png")]


def test_existing_path_with_glob_characters_is_a_path(tmp_path: Path) -> None:
    _touch(tmp_path / "shot[1].png", tmp_path / "shot1.png")
    assert expand_inputs([str(tmp_path / "shot[1].png")]) == [str(tmp_path / "shot[1].png")]


def test_stdin_list_skips_blank_lines_and_is_not_expanded(tmp_path: Path) -> None:
    _touch(tmp_path / "dir" / "a.png")
    stdin = io.StringIO(f"{tmp_path}/one.png\n\n   \r\n{tmp_path}/*.png\r\n{tmp_path}/dir\n")
    assert expand_inputs(["-"], stdin=stdin) == [
        f"{tmp_path}/one.png",
        f"{tmp_path}/*.png",
        f"{tmp_path}/dir",
    ]


def test_order_kept_and_duplicates_removed_first_wins(tmp_path: Path) -> None:
    _touch(tmp_path / "a.png", tmp_path / "b.png")
    a, b = str(tmp_path / "a.png"), str(tmp_path / "b.png")
    dotted = str(tmp_path / "." / "a.png")
    assert expand_inputs([b, str(tmp_path), dotted, "-"], stdin=io.StringIO(f"{a}\n")) == [b, a]


def test_symlink_loop_terminates_and_lists_each_file_once(tmp_path: Path) -> None:
    _touch(tmp_path / "root" / "sub" / "a.png")
    os.symlink(tmp_path / "root", tmp_path / "root" / "sub" / "loop")
    assert expand_inputs([str(tmp_path / "root")]) == [str(tmp_path / "root" / "sub" / "a.png")]


def test_symlinked_folder_is_followed(tmp_path: Path) -> None:
    _touch(tmp_path / "real" / "a.png")
    (tmp_path / "view").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "view" / "linked")
    assert expand_inputs([str(tmp_path / "view")]) == [str(tmp_path / "view" / "linked" / "a.png")]


@pytest.mark.parametrize("specs", [[], ["-"]])
def test_nothing_to_do_is_a_value_error(specs: list[str]) -> None:
    with pytest.raises(ValueError):
        expand_inputs(specs, stdin=io.StringIO("\n\n"))


def test_empty_folder_is_a_value_error(tmp_path: Path) -> None:
    _touch(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="no input images"):
        expand_inputs([str(tmp_path)])
