"""`--device cuda:all`'s machinery: one worker process per device into one --out, run here with CPU "devices"
(the mechanism does not depend on the device kind): together they explain each input once, name files as a
single run would, keep the manifest whole, relay whole lines, and report the worst exit code."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from xattn_cli.cli.app import app
from xattn_cli.fanout import WORKER_ENV, run_per_device, with_device, worker_part
from xattn_cli.io.inputs import expand_inputs
from xattn_cli.world.shapes import scene_at

TEXTS = ["--text", "a red circle", "--text", "a blue star"]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fanout-scenes")
    (folder / "sub").mkdir()
    for index in range(9):
        scene_at(8, index, size=64, n_objects=2).image.save(folder / ("sub" if index % 4 == 0 else ".") / f"s{index}.png")
    return folder


def without_meta(record: dict) -> dict:
    return {key: value for key, value in record.items() if key != "meta"}


def manifest(out: Path) -> list[dict]:
    text = (out / "results.jsonl").read_text(encoding="utf-8")
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]  # every line whole


def test_with_device_rewrites_both_spellings():
    assert with_device(["surgery", "x.png", "--device", "cuda:all", "--text", "a"], "cuda:1") == \
        ["surgery", "x.png", "--device", "cuda:1", "--text", "a"]
    assert with_device(["--device=cuda:all", "y"], "cpu") == ["--device=cpu", "y"]


def test_worker_part_reads_its_environment():
    assert worker_part({}) is None and worker_part({WORKER_ENV: "2/3"}) == (2, 3)


def test_a_worker_explains_every_nth_input_of_its_shard(scenes, tmp_path, monkeypatch):
    monkeypatch.setenv(WORKER_ENV, "1/2")
    result = CliRunner().invoke(app, ["surgery", str(scenes), *TEXTS, "--out", str(tmp_path / "out"), "-f", "jsonl",
                                      "-q", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    explained = [json.loads(line)["image"] for line in result.stdout.splitlines()]
    assert explained == expand_inputs([str(scenes)])[1::2]


def test_workers_together_equal_a_single_run(scenes, tmp_path):
    single_out, fanned_out = tmp_path / "single", tmp_path / "fanned"
    args = ["surgery", str(scenes), *TEXTS, "--save-maps", "--device", "cpu", "--threads", "1"]
    single = subprocess.run([sys.executable, "-m", "xattn_cli", *args, "--out", str(single_out), "-f", "jsonl"],
                            capture_output=True, text=True, check=True)
    lines: list[str] = []
    code = run_per_device([*args, "--out", str(fanned_out)], ["cpu", "cpu"], stdin_text=None,
                          on_line=lines.append)
    assert code == 0
    relayed = [json.loads(line) for line in lines]  # whole lines only
    expected = {r["image"]: r for r in map(json.loads, single.stdout.splitlines())}
    assert len(relayed) == len(expected) == 9
    assert {r["image"]: without_meta(r) for r in manifest(fanned_out)} == \
        {image: without_meta(r) for image, r in _relocated(expected, single_out, fanned_out).items()}
    for record in manifest(fanned_out):
        for target in record["targets"]:
            assert Path(target["overlay"]).is_file() and Path(target["map"]).is_file()


def _relocated(records: dict[str, dict], old: Path, new: Path) -> dict[str, dict]:
    """The records with their artifact paths moved from folder `old` to `new` (same names)."""
    return {image: {**record, "targets": [{**target, "overlay": target["overlay"].replace(str(old), str(new)),
                                          "map": target["map"].replace(str(old), str(new))}
                                         for target in record["targets"]]}
            for image, record in records.items()}


def test_stdin_goes_to_every_worker_and_the_worst_exit_code_wins(scenes, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    listed = "\n".join([*map(str, sorted(scenes.glob("*.png"))[:3]), str(broken)]) + "\n"
    lines: list[str] = []
    code = run_per_device(["surgery", "-", *TEXTS, "--out", str(tmp_path / "out"), "--device", "cpu"],
                          ["cpu", "cpu"], stdin_text=listed, on_line=lines.append)
    statuses = sorted(json.loads(line)["status"] for line in lines)
    assert code == 1 and statuses == ["error", "ok", "ok", "ok"]


def test_cuda_all_without_a_gpu_is_one_line_and_exit_2(scenes, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: cuda:all would run")
    result = subprocess.run([sys.executable, "-m", "xattn_cli", "surgery", str(scenes), *TEXTS, "--device", "cuda:all",
                             "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "no GPU is visible" in result.stderr


def test_cuda_all_is_refused_where_one_process_runs(tmp_path):
    result = CliRunner().invoke(app, ["bench", "perf", "--device", "cuda:all", "-q"])
    assert result.exit_code == 2 and "cuda:all" in result.output
