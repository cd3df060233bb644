"""Atomic artifact writes, safe names and the results.jsonl manifest behind --resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xattn_cli.io import outputs
from xattn_cli.io.outputs import (
    OutputNamer,
    ResultsLog,
    atomic_save_npy,
    atomic_save_png,
    atomic_write_bytes,
    slugify,
    to_jsonable,
)


def test_atomic_writes_produce_the_files_and_no_temporaries(tmp_path: Path) -> None:
    atomic_write_bytes(tmp_path / "a.bin", b"abc")
    atomic_save_npy(tmp_path / "m.npy", np.eye(2, dtype=np.float32))
    atomic_save_png(tmp_path / "o.png", Image.new("RGB", (3, 2), "red"))
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "m.npy", "o.png"]
    assert (tmp_path / "a.bin").read_bytes() == b"abc"
    np.testing.assert_array_equal(np.load(tmp_path / "m.npy"), np.eye(2, dtype=np.float32))
    with Image.open(tmp_path / "o.png") as image:
        assert image.size == (3, 2)


def test_failed_replace_keeps_old_file_and_removes_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")

    def fail(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(outputs.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new")
    assert os.listdir(tmp_path) == ["a.bin"] and target.read_bytes() == b"old"


def test_failed_encoding_removes_temporary(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        atomic_save_npy(tmp_path / "m.npy", np.array([object()], dtype=object))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    ("text", "slug"),
    [
        ("A Red Circle!", "a-red-circle"),
        ("../../x", "x"),
        ("/etc/passwd", "etc-passwd"),
        ("", "target"),
        ("...", "target"),
        ("snake__case", "snake-case"),
        ("Café au lait", "café-au-lait"),
        ("狗", "狗"),
    ],
)
def test_slugify(text: str, slug: str) -> None:
    assert slugify(text) == slug


def test_slugify_truncates_without_trailing_dash() -> None:
    assert slugify("ab cd", max_len=3) == "ab"
    assert len(slugify("x" * 500)) == 60


def test_namer_plain_stems_and_artifact_path(tmp_path: Path) -> None:
    namer = OutputNamer(["imgs/Dog Photo.JPG", "imgs/cat.png"])
    assert namer.stem("imgs/Dog Photo.JPG") == "dog-photo"
    assert namer.stem("./imgs/cat.png") == "cat"
    assert namer.artifact_path(tmp_path, "imgs/cat.png", "a cat", "png") == tmp_path / "cat__a-cat.png"


def test_namer_collisions_get_distinct_hash_suffixes() -> None:
    paths = ["a/dog.png", "b/dog.png", "b/Dog.jpg", "c/cat.png"]
    namer = OutputNamer(paths)
    stems = [namer.stem(path) for path in paths]
    assert len(set(stems)) == 4 and stems[3] == "cat"
    assert all(stem.startswith("dog-") and len(stem) == len("dog-") + 6 for stem in stems[:3])
    assert OutputNamer(list(reversed(paths))).stem("a/dog.png") == stems[0]


def test_namer_target_slug_collisions_do_not_overwrite(tmp_path: Path) -> None:
    namer = OutputNamer(["x.png"])
    first = namer.artifact_path(tmp_path, "x.png", "a dog", "png")
    second = namer.artifact_path(tmp_path, "x.png", "a-dog", "png")
    assert first == tmp_path / "x__a-dog.png" and second != first
    assert namer.artifact_path(tmp_path, "x.png", "a dog", "npy") == tmp_path / "x__a-dog.npy"


def test_namer_stays_inside_out_dir(tmp_path: Path) -> None:
    namer = OutputNamer(["../../etc/passwd.png"])
    path = namer.artifact_path(tmp_path, "../../etc/passwd.png", "../../x", "png")
    assert path.resolve().parent == tmp_path.resolve()
    with pytest.raises(ValueError):
        namer.artifact_path(tmp_path, "../../etc/passwd.png", "x", "png/../../y")
    with pytest.raises(KeyError):
        namer.stem("other.png")


def test_to_jsonable_converts_numpy_tuples_and_paths() -> None:
    record = {"size": (np.int64(3), 4), "score": np.float32(0.5), "peak": np.array([1, 2]), "p": Path("a")}
    assert json.dumps(to_jsonable(record)) == '{"size": [3, 4], "score": 0.5, "peak": [1, 2], "p": "a"}'


def _ok_record(image: str, out_dir: Path, stem: str) -> dict[str, object]:
    overlay, raw_map = out_dir / f"{stem}__t.png", out_dir / f"{stem}__t.npy"
    target = {"target": "t", "overlay": str(overlay), "map": str(raw_map)}
    return {"image": image, "status": "ok", "targets": [target]}


def test_results_log_appends_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with ResultsLog(out) as log:
        log.append(_ok_record("complete.png", out, "complete"))
        log.append(_ok_record("missing-map.png", out, "missing"))
        log.append({"image": "failed.png", "status": "error", "error": {"type": "X", "message": "m"}})
        log.append({"image": "retried.png", "status": "error", "error": {"type": "X", "message": "m"}})
        log.append(_ok_record("retried.png", out, "retried"))
        log.append(_ok_record("later-failed.png", out, "later"))
        log.append({"image": "later-failed.png", "status": "error", "error": {"type": "X", "message": "m"}})
        log.append({"image": "no-targets.png", "status": "ok", "targets": [], "note": "ünïcode"})
    for name in ("complete__t.png", "complete__t.npy", "missing__t.png", "retried__t.png", "retried__t.npy"):
        (out / name).write_bytes(b"")
    lines = (out / "results.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 8 and "ünïcode" in lines[-1]
    with ResultsLog(out) as log:
        assert log.done_items() == {"complete.png", "retried.png", "no-targets.png"}


def test_resume_removes_only_the_temporaries_of_unfinished_writes(tmp_path: Path) -> None:
    from xattn_cli.io.outputs import atomic_write_bytes

    atomic_write_bytes(tmp_path / "kept.png", b"done")
    unfinished = tmp_path / ".scene__a-star.npy.0a1b2c3d.tmp"  # what a SIGKILL during a write leaves
    unfinished.write_bytes(b"half")
    users = [tmp_path / ".notes.tmp", tmp_path / "scene.0a1b2c3d.tmp", tmp_path / ".x.0A1B2C3D.tmp"]
    for path in users:
        path.write_bytes(b"")
    with ResultsLog(tmp_path) as log:
        assert log.remove_unfinished_writes() == 1
    assert not unfinished.exists() and all(path.exists() for path in users)
    assert (tmp_path / "kept.png").read_bytes() == b"done"


def test_results_log_ignores_and_truncates_a_cut_off_last_line(tmp_path: Path) -> None:
    with ResultsLog(tmp_path) as log:
        log.append({"image": "a.png", "status": "ok"})
    with open(tmp_path / "results.jsonl", "a", encoding="utf-8") as file:
        file.write('{"image": "b.png", "sta')  # a run killed mid-line
    with ResultsLog(tmp_path) as log:
        assert log.done_items() == {"a.png"}
        log.append({"image": "c.png", "status": "ok"})
        assert log.done_items() == {"a.png", "c.png"}
    lines = (tmp_path / "results.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["image"] for line in lines] == ["a.png", "c.png"]  # the cut-off line is gone


def test_results_log_rejects_nan(tmp_path: Path) -> None:
    with ResultsLog(tmp_path) as log, pytest.raises(ValueError):
        log.append({"image": "a.png", "status": "ok", "score": float("nan")})
