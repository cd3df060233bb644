"""Large runs (issue 18): --shard I/N, `xattn merge`, --overlays, and a manifest that stays whole when
runs share an --out folder, are killed, or run out of disk."""
from __future__ import annotations

import errno
import json
import multiprocessing
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from xattn_cli.cli.app import app
from xattn_cli.io import outputs
from xattn_cli.io.outputs import ResultsLog
from xattn_cli.io.shards import in_shard, parse_shard, shard_of

runner = CliRunner()
TEXTS = ["--text", "a red circle", "--text", "a blue star"]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    from xattn_cli.world.shapes import scene_at

    folder = tmp_path_factory.mktemp("scenes")
    (folder / "b").mkdir()
    for i in range(7):
        scene_at(6, i, size=64, n_objects=2).image.save(folder / ("b" if i % 3 == 0 else ".") / f"s{i % 5}.png")
    return folder


def explain(folder: Path, out: Path, *extra: str) -> list[dict]:
    result = runner.invoke(app, ["surgery", str(folder), *TEXTS, "--out", str(out), "-f", "jsonl", "-q",
                                 "--save-maps", "--batch-size", "1", *extra])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def manifest(out: Path) -> list[dict]:
    text = (out / "results.jsonl").read_text(encoding="utf-8")
    assert text == "" or text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]  # raises on any partial line


def comparable(record: dict) -> dict:
    """A record without timings, artifact paths as file names."""
    targets = [{**t, "overlay": t["overlay"] and Path(t["overlay"]).name, "map": t["map"] and Path(t["map"]).name}
               for t in record["targets"]]
    return {**{k: v for k, v in record.items() if k != "meta"}, "targets": targets}


# --- the partition -----------------------------------------------------------------------------------
@pytest.mark.parametrize("count", [1, 2, 3, 7, 16])
def test_shards_cover_every_input_exactly_once(count):
    paths = [f"imgs/{i // 10}/scene {i}.png" for i in range(200)] + ["ünï.jpg", "-odd name.png"]
    shards = [in_shard(paths, index, count) for index in range(count)]
    assert sorted(path for shard in shards for path in shard) == sorted(paths)
    assert sum(len(shard) for shard in shards) == len(paths)
    for shard in shards:
        assert shard == [path for path in paths if path in shard]  # input order kept
    if count > 1:
        assert all(shards), "sha1 spreads 202 paths over every shard"


def test_shard_is_a_stable_hash_of_the_path_string():
    import hashlib

    assert shard_of("a/b.png", 7) == int(hashlib.sha1(b"a/b.png").hexdigest(), 16) % 7
    assert shard_of("a/b.png", 1) == 0


@pytest.mark.parametrize("text", ["3/3", "1", "a/2", "-1/2", "0/0", "1/2/3", ""])
def test_bad_shard_is_a_usage_error(text, scenes, tmp_path):
    from xattn_cli.errors import UsageError

    with pytest.raises(UsageError):
        parse_shard(text)
    result = runner.invoke(app, ["surgery", str(scenes), *TEXTS, "--out", str(tmp_path), "--shard", text])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "--shard" in result.stderr


@pytest.mark.parametrize("command", [["surgery", *TEXTS], ["relevancy"], ["mask"]])
def test_every_map_command_takes_shard_and_an_empty_shard_does_nothing(command, tmp_path):
    image = tmp_path / "one.png"
    Image.new("RGB", (32, 32)).save(image)
    bad = runner.invoke(app, [*command, str(image), "--out", str(tmp_path / "out"), "--shard", "5/5"])
    assert bad.exit_code == 2 and bad.stderr.count("\n") == 1 and "--shard" in bad.stderr
    empty = next(index for index in range(5) if shard_of(str(image), 5) != index)
    result = runner.invoke(app, [*command, str(image), "--out", str(tmp_path / "out"), "-f", "json",
                                 "--shard", f"{empty}/5"])
    assert result.exit_code == 0 and json.loads(result.stdout) == []
    assert "holds none" in result.stderr
    assert manifest(tmp_path / "out") == []  # an empty manifest, which `xattn merge` takes like any other


# --- shards and merge --------------------------------------------------------------------------------
def test_merged_shards_equal_a_single_run(scenes, tmp_path):
    single = {r["image"]: r for r in explain(scenes, tmp_path / "single")}
    assert len(single) == 7
    shard_outs = [tmp_path / f"shard{index}" for index in range(3)]
    seen = []
    for index, out in enumerate(shard_outs):
        seen += [r["image"] for r in explain(scenes, out, "--shard", f"{index}/3")]
    assert sorted(seen) == sorted(single)  # disjoint, and together every image
    merged_out = tmp_path / "merged"
    result = runner.invoke(app, ["merge", *map(str, shard_outs), "--out", str(merged_out)])
    assert result.exit_code == 0, result.output
    merged = {r["image"]: r for r in manifest(merged_out)}
    assert {image: comparable(r) for image, r in merged.items()} == {i: comparable(r) for i, r in single.items()}
    for image, record in merged.items():
        for target, expected in zip(record["targets"], single[image]["targets"]):
            for key in ("overlay", "map"):
                assert Path(target[key]).parent == merged_out  # the merged folder stands alone
                assert Path(target[key]).read_bytes() == Path(expected[key]).read_bytes()
    for out in shard_outs:
        shutil.rmtree(out)
    resumed = runner.invoke(app, ["surgery", str(scenes), *TEXTS, "--out", str(merged_out), "--save-maps",
                                  "--resume", "-f", "jsonl"])
    assert resumed.exit_code == 0 and "skipped 7" in resumed.stderr  # nothing left to do


def test_merge_accepts_equal_duplicates_and_refuses_different_ones(scenes, tmp_path):
    first = tmp_path / "first"
    explain(scenes, first, "--shard", f"{shard_of(str(scenes / 's1.png'), 2)}/2")  # a shard holding s1.png
    twin = tmp_path / "twin"
    shutil.copytree(first, twin)
    lines = (twin / "results.jsonl").read_text().splitlines()
    for number, line in enumerate(lines):  # same results, other timings: fine
        record = json.loads(line)
        record["meta"]["elapsed_ms"] += 1000
        lines[number] = json.dumps(record)
    (twin / "results.jsonl").write_text("\n".join(lines) + "\n")
    same = runner.invoke(app, ["merge", str(first), str(twin), "--out", str(tmp_path / "same")])
    assert same.exit_code == 0, same.output
    assert len(manifest(tmp_path / "same")) == len(lines)

    record = json.loads(lines[0])
    record["targets"][0]["score"] += 0.01
    (twin / "results.jsonl").write_text("\n".join([json.dumps(record)] + lines[1:]) + "\n")
    different = runner.invoke(app, ["merge", str(first), str(twin), "--out", str(tmp_path / "different")])
    assert different.exit_code == 2
    assert different.stderr.count("\n") == 1 and record["image"] in different.stderr
    assert not (tmp_path / "different" / "results.jsonl").exists()


def test_merge_of_a_folder_without_results_is_a_usage_error(tmp_path):
    result = runner.invoke(app, ["merge", str(tmp_path), "--out", str(tmp_path / "m")])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1


# --- overlays ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, image_format", [("jpg", "JPEG"), ("none", None)])
def test_overlay_kinds_and_their_report(kind, image_format, scenes, tmp_path):
    out = tmp_path / "out"
    records = explain(scenes / "b", out, "--overlays", kind)
    for record in records:
        for target in record["targets"]:
            assert Path(target["map"]).is_file()
            if image_format is None:
                assert target["overlay"] is None
            else:
                assert Path(target["overlay"]).suffix == ".jpg"
                assert Image.open(target["overlay"]).format == image_format
    assert not list(out.glob("*.png")) and (kind == "jpg") == bool(list(out.glob("*.jpg")))
    report = runner.invoke(app, ["report", str(out)])
    assert report.exit_code == 0, report.output
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64") >= (2 if kind == "jpg" else 1)
    assert ("no overlay written" in page) == (kind == "none")
    resumed = runner.invoke(app, ["surgery", str(scenes / "b"), *TEXTS, "--out", str(out), "--save-maps",
                                  "--overlays", kind, "--resume", "-f", "jsonl"])
    assert resumed.exit_code == 0 and "skipped" in resumed.stderr


def test_png_overlays_are_lossless(tmp_path):
    """PNG at the fast compression level still round-trips exactly (its speed is a benchmark matter)."""
    outputs.atomic_save_overlay(tmp_path / "a.png", Image.new("RGB", (8, 8), (1, 2, 3)), "png")
    assert Image.open(tmp_path / "a.png").getpixel((0, 0)) == (1, 2, 3)


# --- the manifest ------------------------------------------------------------------------------------
def _append_many(out: str, writer: int) -> None:
    with ResultsLog(out) as log:
        for number in range(150):
            log.append({"image": f"{writer}-{number}.png", "status": "ok", "padding": "x" * 20_000})


def test_two_processes_appending_to_one_manifest_leave_whole_lines(tmp_path):
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=_append_many, args=(str(tmp_path), writer)) for writer in range(2)]
    for process in writers:
        process.start()
    for process in writers:
        process.join(120)
        assert process.exitcode == 0
    images = [record["image"] for record in manifest(tmp_path)]
    assert sorted(images) == sorted(f"{w}-{n}.png" for w in range(2) for n in range(150))


def test_two_shard_runs_into_one_out_leave_a_valid_manifest(scenes, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "out"
    runs = [subprocess.Popen([sys.executable, "-m", "xattn_cli", "surgery", str(scenes), *TEXTS, "--out", str(out),
                              "-q", "-f", "jsonl", "--shard", f"{index}/2", "--overlays", "none"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for index in range(2)]
    for run in runs:
        assert run.wait(300) == 0, run.stderr.read()
    assert sorted(r["image"] for r in manifest(out)) == sorted(str(p) for p in scenes.rglob("*.png"))


def test_a_cut_off_line_is_truncated_and_resume_completes_every_image(scenes, tmp_path):
    out = tmp_path / "out"
    explain(scenes, out)
    whole = (out / "results.jsonl").read_bytes()
    lines = whole.splitlines(keepends=True)
    cut = b"".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2]  # the disk filled up mid-line
    (out / "results.jsonl").write_bytes(cut)
    redone = explain(scenes, out, "--resume")
    assert [r["image"] for r in redone] == [json.loads(lines[-1])["image"]]
    final = manifest(out)  # every line whole: the partial one is gone, not sealed
    assert len(final) == len(lines) and all(r["status"] == "ok" for r in final)
    assert sorted(r["image"] for r in final) == sorted(str(p) for p in scenes.rglob("*.png"))


def test_a_failed_append_leaves_no_partial_line(tmp_path, monkeypatch):
    with ResultsLog(tmp_path) as log:
        log.append({"image": "a.png", "status": "ok"})
        real_write = os.write

        def disk_full(descriptor, data):
            real_write(descriptor, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(outputs.os, "write", disk_full)
        with pytest.raises(OSError):
            log.append({"image": "b.png", "status": "ok", "padding": "y" * 1000})
        monkeypatch.setattr(outputs.os, "write", real_write)
        assert [r["image"] for r in manifest(tmp_path)] == ["a.png"]
        log.append({"image": "c.png", "status": "ok"})
    assert [r["image"] for r in manifest(tmp_path)] == ["a.png", "c.png"]


def test_resume_leaves_the_temporaries_of_another_live_run_alone(tmp_path):
    in_flight = tmp_path / ".scene__a-star.png.0a1b2c3d.tmp"  # another run's write, under way
    in_flight.write_bytes(b"half")
    with ResultsLog(tmp_path) as other_run:
        with ResultsLog(tmp_path) as resumed:
            assert resumed.remove_unfinished_writes() == 0 and in_flight.exists()
        other_run.append({"image": "a.png", "status": "ok"})
    with ResultsLog(tmp_path) as alone:
        assert alone.remove_unfinished_writes() == 1 and not in_flight.exists()
        assert alone.done_items() == {"a.png"}


# --- --layout tree -----------------------------------------------------------------------------------
def test_tree_layout_mirrors_the_input_folders_with_the_flat_names(scenes, tmp_path):
    flat = {r["image"]: r for r in explain(scenes, tmp_path / "flat")}
    tree_out = tmp_path / "tree"
    tree = {r["image"]: r for r in explain(scenes, tree_out, "--layout", "tree")}
    assert {i: comparable(r) for i, r in tree.items()} == {i: comparable(r) for i, r in flat.items()}
    folders = set()
    for image, record in tree.items():
        for target, flat_target in zip(record["targets"], flat[image]["targets"]):
            for key in ("overlay", "map"):
                expected = tree_out / Path(image).parent.relative_to(scenes) / Path(flat_target[key]).name
                assert Path(target[key]) == expected and expected.read_bytes() == Path(flat_target[key]).read_bytes()
                folders.add(expected.parent)
    assert folders == {tree_out, tree_out / "b"}


def test_tree_layout_resumes_merges_and_reports(scenes, tmp_path):
    shard_outs = [tmp_path / f"shard{index}" for index in range(2)]
    for index, out in enumerate(shard_outs):
        explain(scenes, out, "--layout", "tree", "--shard", f"{index}/2")
    merged_out = tmp_path / "merged"
    assert runner.invoke(app, ["merge", *map(str, shard_outs), "--out", str(merged_out)]).exit_code == 0
    merged = manifest(merged_out)
    nested = [t["overlay"] for r in merged for t in r["targets"] if Path(t["overlay"]).parent == merged_out / "b"]
    assert len(merged) == 7 and nested and all(Path(t[key]).is_file() for r in merged for t in r["targets"]
                                               for key in ("overlay", "map"))
    lost = Path(nested[0])
    lost.unlink()  # one nested file gone: --resume redoes exactly its image
    redone = explain(scenes, merged_out, "--layout", "tree", "--resume")
    assert [Path(t["overlay"]) for r in redone for t in r["targets"]].count(lost) == 1 and len(redone) == 1
    assert lost.is_file()
    page = runner.invoke(app, ["report", str(merged_out)])
    assert page.exit_code == 0, page.output
    html = (merged_out / "report.html").read_text(encoding="utf-8")
    assert "overlay not found" not in html and html.count('alt="overlay"') == 14


def test_records_without_their_run_folder_find_artifacts_by_name(tmp_path):
    (tmp_path / "x__a.png").write_bytes(b"png")
    old = {"image": "x.png", "status": "ok", "targets": [{"overlay": "elsewhere/x__a.png", "map": None}]}
    assert outputs.artifact_in(tmp_path, old, "elsewhere/x__a.png") == tmp_path / "x__a.png"
    escaping = {**old, "meta": {"out": "elsewhere/deeper"}}  # a path outside the run's folder: by name only
    assert outputs.artifact_in(tmp_path, escaping, "elsewhere/x__a.png") == tmp_path / "x__a.png"
