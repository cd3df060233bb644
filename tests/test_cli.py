"""The command line through CliRunner (in process) and real subprocesses: outputs, exit codes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from xattn_cli.cli.app import app

runner = CliRunner()
TEXTS = ["--text", "a red circle", "--text", "a blue star"]


@pytest.fixture
def scenes(tmp_path: Path) -> list[Path]:
    from xattn_cli.world.shapes import scene_at

    folder = tmp_path / "imgs"
    (folder / "nested").mkdir(parents=True)
    paths = [folder / "one.png", folder / "nested" / "two.png", folder / "nested" / "one.png"]
    for i, path in enumerate(paths):
        scene_at(3, i, size=96, n_objects=2).image.save(path)
    Image.new("RGB", (300, 200), (90, 90, 90)).save(folder / "wide.jpg")
    (folder / "notes.txt").write_text("not an image")
    return paths + [folder / "wide.jpg"]


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def run(args: list[str], **kwargs):
    return subprocess.run([sys.executable, "-m", "xattn_cli", *args], capture_output=True, text=True,
                          timeout=300, **kwargs)


def test_help_does_not_import_torch():
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom xattn_cli.cli.app import app\n"
            "result = CliRunner().invoke(app, ['--help'])\nassert result.exit_code == 0, result.output\n"
            "result = CliRunner().invoke(app, ['--version'])\nassert result.exit_code == 0\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'open_clip', 'transformers', 'numpy')))")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "[]"


CLIP_HELD_OUT = 20_000  # benchmarks/shapes_clip.py's zero-shot stream (HELD_OUT)
CLIP_SCENES = (0, 2, 5)  # scenes of it that shapes-clip classifies right (picked by running it once)


def test_bundled_clip_scores_the_scene_caption_highest(tmp_path):
    """As the zero-shot benchmark measures it (plain captions, native 64 px, where the surgery score is CLIP's
    own cosine): the score over the 36 class captions ranks each held-out scene's own caption first."""
    from xattn_cli.train.shapes_clip import CLASS_CAPTIONS
    from xattn_cli.world.shapes import scene_at

    captions = {}
    for index in CLIP_SCENES:
        scene = scene_at(CLIP_HELD_OUT, index, size=64, n_objects=1)
        scene.image.save(tmp_path / f"scene-{index}.png")
        captions[f"scene-{index}.png"] = scene.captions[0]
    texts = [arg for caption in CLASS_CAPTIONS for arg in ("--text", caption)]
    result = runner.invoke(app, ["surgery", *[str(tmp_path / name) for name in captions], *texts,
                                 "--no-ensemble", "--size", "64", "--out", str(tmp_path / "out"), "--format", "jsonl"])
    assert result.exit_code == 0, result.output
    outputs = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(outputs) == len(CLIP_SCENES)
    for record in outputs:
        best = max(record["targets"], key=lambda target: target["score"])
        assert best["target"] == captions[Path(record["image"]).name]


def test_folder_run_writes_the_output_contract(scenes, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["surgery", str(scenes[0].parent), *TEXTS, "--out", str(out), "--save-maps",
                                 "--format", "jsonl", "--device", "cpu", "--batch-size", "3"])
    assert result.exit_code == 0, result.output
    stdout_records = [json.loads(line) for line in result.stdout.splitlines()]
    written = records(out)
    assert [r["image"] for r in stdout_records] == [r["image"] for r in written]
    assert len(written) == 4  # the .txt file is not an image of a folder
    stems = set()
    for record in written:
        assert record["status"] == "ok" and record["method"] == "surgery" and record["model"] == "shapes-clip"
        width, height = Image.open(record["image"]).size
        assert record["size"] == [width, height]
        assert {"xattn", "torch", "device", "precision", "templates", "elapsed_ms"} <= set(record["meta"])
        assert [t["target"] for t in record["targets"]] == ["a red circle", "a blue star"]
        for target in record["targets"]:
            heatmap = np.load(target["map"])
            assert heatmap.dtype == np.float32 and heatmap.shape == (height, width)
            assert 0 <= heatmap.min() and heatmap.max() <= 1
            assert Image.open(target["overlay"]).size == (width, height)
            assert target["peak"] == [int(np.argmax(heatmap) % width), int(np.argmax(heatmap) // width)]
            stems.add(Path(target["map"]).name)
    assert len(stems) == 8  # the two one.png files got distinct names


def test_missing_file_among_good_ones_exits_1_and_keeps_the_good_results(scenes, tmp_path):
    out = tmp_path / "out"
    missing = str(tmp_path / "nope.png")
    result = runner.invoke(app, ["surgery", str(scenes[0]), missing, *TEXTS, "--out", str(out), "-f", "jsonl"])
    assert result.exit_code == 1
    by_image = {r["image"]: r for r in records(out)}
    assert by_image[str(scenes[0])]["status"] == "ok"
    assert by_image[missing]["status"] == "error"
    assert by_image[missing]["error"]["type"] == "FileNotFound"


def test_json_format_is_one_array(scenes, tmp_path):
    result = runner.invoke(app, ["surgery", str(scenes[0]), *TEXTS, "-o", str(tmp_path / "o"), "-f", "json"])
    assert result.exit_code == 0
    parsed = json.loads(result.stdout)
    assert isinstance(parsed, list) and parsed[0]["status"] == "ok"


def test_single_text_and_points(scenes, tmp_path):
    result = runner.invoke(app, ["surgery", str(scenes[0]), "--text", "a red circle", "--points", "3",
                                 "--no-ensemble", "-o", str(tmp_path / "o"), "-f", "jsonl"])
    assert result.exit_code == 0, result.output
    (target,) = json.loads(result.stdout)["targets"]
    assert 1 <= len(target["points"]) <= 3
    assert json.loads(result.stdout)["meta"]["templates"] == 1


def test_stdin_list(scenes, tmp_path):
    listing = "\n".join(str(p) for p in scenes[:2]) + "\n"
    result = runner.invoke(app, ["surgery", "-", *TEXTS, "-o", str(tmp_path / "o"), "-f", "jsonl"], input=listing)
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == 2


@pytest.mark.parametrize("args, message", [
    (["--model", "no-such-model"], "unknown model"),
    (["--size", "abc"], "bad --size"),
    (["--device", "cuda"], "CUDA is not available"),
    (["--model", "clip"], "shapes-clip"),
    (["--pretrained", "/does/not/exist.safetensors"], "checkpoint not found"),
    (["--precision", "fp16", "--device", "cpu"], "fp16 needs CUDA"),
    (["--blocks", "99"], "surgery blocks must be in 1..6"),
])
def test_usage_errors_exit_2_with_one_line(scenes, tmp_path, args, message):
    result = runner.invoke(app, ["surgery", str(scenes[0]), *TEXTS, "-o", str(tmp_path / "o"), *args])
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "results.jsonl").exists() or not records(tmp_path / "o")


def test_empty_text_is_a_usage_error(scenes, tmp_path):
    result = runner.invoke(app, ["surgery", str(scenes[0]), "--text", "", "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--text must not be empty" in result.stderr


def test_models_lists_the_registry():
    result = runner.invoke(app, ["models", "-f", "json"])
    assert result.exit_code == 0
    names = {row["name"]: row for row in json.loads(result.stdout)}
    assert names["shapes-clip"]["weights"] == "bundled" and "surgery" in names["shapes-clip"]["methods"]
    assert {"clip", "openclip:...", "hf:..."} <= set(names)


def test_subprocess_end_to_end_and_pipe_default_is_jsonl(scenes, tmp_path):
    out = tmp_path / "out"
    completed = run(["surgery", str(scenes[0]), *TEXTS, "--out", str(out)])
    assert completed.returncode == 0, completed.stderr
    assert "Traceback" not in completed.stderr
    record = json.loads(completed.stdout)  # stdout is a pipe here: jsonl by default
    assert record["status"] == "ok"
    completed = run(["surgery", str(scenes[0]), *TEXTS, "--model", "nope", "--out", str(out)])
    assert completed.returncode == 2 and completed.stderr.count("\n") == 1
