"""The writer pool: files written off the model's thread, records in input order, a batch per manifest append,
an ok record only after its files exist, a failed write an error record; thread defaults; bench --end-to-end."""
from __future__ import annotations

import errno
import json
import time

import pytest
import torch
from typer.testing import CliRunner

from xattn_cli import device, runner
from xattn_cli.cli.app import app
from xattn_cli.explainers.surgery import SurgeryExplainer
from xattn_cli.io.outputs import ResultsLog, read_records
from xattn_cli.models.registry import load_model
from xattn_cli.world.shapes import scene_at

BATCH = 3


@pytest.fixture(scope="module")
def explainer():
    return SurgeryExplainer(load_model("shapes-clip", None, "cpu"), ["a red circle", "a blue star"], text_cache=False)


@pytest.fixture
def scenes(tmp_path) -> list[str]:
    paths = []
    for index in range(10):
        path = tmp_path / "scenes" / f"scene-{index}.png"
        path.parent.mkdir(exist_ok=True)
        scene_at(5, index, size=64).image.save(path)
        paths.append(str(path))
    return paths


def test_records_keep_input_order_when_writes_finish_out_of_order(explainer, scenes, tmp_path, monkeypatch):
    real_save = runner.atomic_save_overlay

    def slow_for_early_images(path, image, kind):
        index = int(str(path).split("scene-")[1].split("__")[0])
        time.sleep(0.02 * (len(scenes) - index))  # the first images finish last
        real_save(path, image, kind)

    appended: list[int] = []
    real_extend = ResultsLog.extend
    monkeypatch.setattr(runner, "atomic_save_overlay", slow_for_early_images)
    monkeypatch.setattr(ResultsLog, "extend", lambda log, records: (appended.append(len(records)),
                                                                      real_extend(log, records)))
    seen: list[str] = []

    def files_exist_before_the_record(record):
        for target in record["targets"]:
            assert (tmp_path / "out" / target["overlay"].split("/")[-1]).is_file()
        seen.append(record["image"])

    batch_runner = runner.BatchRunner(explainer, tmp_path / "out", device="cpu", batch_size=BATCH, workers=0,
                                      writers=3)
    summary = batch_runner.run(scenes, on_record=files_exist_before_the_record)
    assert summary.ok == len(scenes) and seen == scenes
    assert [record["image"] for record in read_records(tmp_path / "out" / "results.jsonl")] == scenes
    assert sum(appended) == len(scenes) and len(appended) < len(scenes)  # grouped: fewer appends than records,
    assert max(appended) < 2 * BATCH < len(scenes)  # yet never more than two batches behind the model


def test_a_failed_write_is_an_error_record_in_its_place(explainer, scenes, tmp_path, monkeypatch):
    real_save = runner.atomic_save_overlay

    def disk_full_for_scene_4(path, image, kind):
        if "scene-4__" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(path, image, kind)

    monkeypatch.setattr(runner, "atomic_save_overlay", disk_full_for_scene_4)
    summary = runner.BatchRunner(explainer, tmp_path / "out", device="cpu", batch_size=BATCH, workers=0).run(scenes)
    records = list(read_records(tmp_path / "out" / "results.jsonl"))
    assert [record["image"] for record in records] == scenes
    assert [record["status"] for record in records] == ["ok"] * 4 + ["error"] + ["ok"] * 5
    assert records[4]["error"]["type"] == "OSError" and (summary.ok, summary.failed) == (9, 1)


def test_pool_and_single_writer_write_the_same_files(explainer, scenes, tmp_path):
    outputs = {}
    for writers in (1, 3):
        out = tmp_path / f"out-{writers}"
        runner.BatchRunner(explainer, out, device="cpu", batch_size=BATCH, workers=0, writers=writers,
                           save_maps=True).run(scenes)
        outputs[writers] = {path.name: path.read_bytes() for path in out.iterdir() if path.suffix in (".png", ".npy")}
    assert len(outputs[1]) == 4 * len(scenes) and outputs[1] == outputs[3]


@pytest.mark.parametrize(("cores", "threads"), [(1, 1), (2, 1), (3, 1), (16, 8)])
def test_default_threads_leave_half_the_cores_to_decoding_and_writing(monkeypatch, cores, threads):
    monkeypatch.setattr(device.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert device.default_threads() == threads


def test_threads_option_sets_torch_threads(scenes, tmp_path):
    before = torch.get_num_threads()
    try:
        for threads in ("1", "2"):
            result = CliRunner().invoke(app, ["surgery", scenes[0], "--model", "shapes-clip", "--text", "a red circle",
                                              "--threads", threads, "--out", str(tmp_path / "out"), "--format", "jsonl",
                                              "--device", "cpu", "-q"])
            assert result.exit_code == 0, result.output
            assert torch.get_num_threads() == int(threads)
    finally:
        torch.set_num_threads(before)


def test_bench_end_to_end_rows_and_ratios(tmp_path):
    report = tmp_path / "e2e.json"
    before = torch.get_num_threads()
    try:
        result = CliRunner().invoke(app, ["bench", "perf", "--model", "shapes-clip", "--end-to-end", "--scenes", "5",
                                          "--batch-size", "2", "--texts", "2", "--device", "cpu", "--threads", "1",
                                          "--json", str(report), "-q"])
    finally:
        torch.set_num_threads(before)
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    names = [row["name"] for row in data["rows"]]
    assert names == ["surgery", "CLI over a folder, --overlays none",
                     "CLI over a folder, --overlays none --save-maps", "CLI over a folder, --overlays png"]
    assert all(row["items"] == 5 and row["seconds"] > 0 for row in data["rows"])
    speed = {row["name"]: row["items"] / row["seconds"] for row in data["rows"]}
    for name in names[1:]:
        assert data["cli_vs_method"][name] == pytest.approx(speed[name] / speed["surgery"])
    assert data["threads"] == 1 and data["scenes"] == 5 and "× method" in result.stdout
