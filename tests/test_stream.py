"""Decoding in DataLoader workers gives the same stream, records and maps as decoding in process."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from PIL import Image

from helpers import TINY_VIT, tiny_openclip
from xattn_cli.explainers.surgery import SurgeryExplainer
from xattn_cli.io.stream import decoded_images, default_workers
from xattn_cli.runner import BatchRunner
from xattn_cli.world.shapes import scene_at


def mixed_folder(folder):
    """Nine scenes with a missing file and a corrupt file between them; paths in input order."""
    folder.mkdir()
    paths = []
    for i in range(9):
        path = folder / f"{i}.png"
        scene_at(3, i, size=40).image.save(path)
        paths.append(str(path))
    (folder / "corrupt.png").write_bytes(b"\x89PNG not really")
    return paths[:3] + [str(folder / "missing.png")] + paths[3:6] + [str(folder / "corrupt.png")] + paths[6:]


def test_workers_keep_order_and_error_items(tmp_path):
    paths = mixed_folder(tmp_path / "imgs")
    in_process = list(decoded_images(paths, 10**6, workers=0, lookahead=4))
    with_workers = list(decoded_images(paths, 10**6, workers=2, lookahead=4))
    assert [p for p, _, _ in with_workers] == paths
    for (_, image, error), (_, image_w, error_w) in zip(in_process, with_workers):
        assert (error is None) == (error_w is None)
        if error is None:
            assert np.array_equal(np.asarray(image), np.asarray(image_w))
        else:
            assert error.to_record() == error_w.to_record()


def test_runner_records_and_maps_do_not_depend_on_workers(tmp_path):
    paths = mixed_folder(tmp_path / "imgs")
    explainer = SurgeryExplainer(tiny_openclip(TINY_VIT), ["star", "ring"], ensemble=False)
    outputs = {}
    for workers in (0, 2):
        out = tmp_path / f"out{workers}"
        BatchRunner(explainer, out, device="cpu", save_maps=True, batch_size=3, workers=workers).run(paths)
        outputs[workers] = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["image"] for r in outputs[0]] == [r["image"] for r in outputs[2]]
    assert sorted(r["image"] for r in outputs[0]) == sorted(paths)
    for plain, streamed in zip(outputs[0], outputs[2]):
        assert plain["status"] == streamed["status"]
        for a, b in zip(plain.get("targets", []), streamed.get("targets", [])):
            assert np.array_equal(np.load(a["map"]), np.load(b["map"]))


def test_default_workers_only_for_long_runs():
    assert default_workers(16, batch_size=8) == 0
    assert 1 <= default_workers(17, batch_size=8) <= 4


def test_cli_with_workers_reports_bad_items_and_exits_1(tmp_path):
    paths = mixed_folder(tmp_path / "imgs")
    completed = subprocess.run([sys.executable, "-m", "xattn_cli", "surgery", *paths, "--text", "a red star", "--workers", "2",
                                "--batch-size", "2", "--out", str(tmp_path / "out"), "-f", "jsonl"],
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 1 and "Traceback" not in completed.stderr
    lines = [json.loads(line) for line in completed.stdout.splitlines()]
    assert sorted(r["image"] for r in lines) == sorted(paths)  # error records come out as soon as known
    assert {r["image"].rsplit("/", 1)[-1] for r in lines if r["status"] == "error"} == {"missing.png", "corrupt.png"}
    assert all(Image.open(r["targets"][0]["overlay"]).size == (40, 40) for r in lines if r["status"] == "ok")


def test_workers_stop_when_the_run_stops_on_an_error(tmp_path):
    import multiprocessing

    import pytest

    paths = mixed_folder(tmp_path / "imgs")
    explainer = SurgeryExplainer(tiny_openclip(TINY_VIT), ["star"], ensemble=False)
    runner = BatchRunner(explainer, tmp_path / "out", device="cpu", batch_size=2, workers=2)

    def stop(record):
        raise RuntimeError("the consumer failed")

    with pytest.raises(RuntimeError) as caught:
        runner.run(paths, on_record=stop)
    assert caught.value.__traceback__ is not None  # the traceback (and its frames) is still alive here
    assert multiprocessing.active_children() == []


def test_resume_clears_a_killed_runs_unfinished_writes(tmp_path):
    paths = mixed_folder(tmp_path / "imgs")[:2]
    out = tmp_path / "out"
    out.mkdir()
    unfinished = out / ".0__star.png.deadbeef.tmp"
    explainer = SurgeryExplainer(tiny_openclip(TINY_VIT), ["star"], ensemble=False)
    for resume in (False, True):
        unfinished.write_bytes(b"half")
        BatchRunner(explainer, out, device="cpu", workers=0).run(paths, resume=resume)
        assert unfinished.exists() is not resume  # only --resume clears them
