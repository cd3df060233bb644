"""The bundled shapes-lxmert, shapes-visualbert and shapes-detr, offline, through the real CLI; and the
lxmert, visualbert and detr aliases, which fail fast without a hub and name the bundled model.

Quality (held-out accuracy, mAP, pointing) is measured by `benchmarks/shapes_multimodal.py`, not here:
these tests check that the shipped folders load and explain end to end. The subprocesses inherit
HF_HUB_OFFLINE=1 from conftest: every run is offline."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from test_cli import records, run
from xattn_cli.errors import UsageError
from xattn_cli.models.registry import list_models, load_model
from xattn_cli.world.shapes import COLORS, SHAPES, scene_at

VQA_MODELS = ("shapes-lxmert", "shapes-visualbert")


@pytest.fixture(scope="module")
def star_scene(tmp_path_factory) -> tuple[Path, dict]:
    """A 128-px held-out scene with exactly one star, saved as PNG, and its question about the star."""
    for index in range(100):
        scene = scene_at(31_000, index, size=128)
        asked = [qa for qa in scene.qa if qa["question"] == "what colour is the star?"]
        if asked:
            path = tmp_path_factory.mktemp("scene") / "star.png"
            scene.image.save(path)
            return path, asked[0]
    raise AssertionError("no scene with one star in 100")


@pytest.mark.parametrize("name", [*VQA_MODELS, "shapes-detr"])
def test_bundled_folders_are_registered_and_shipped(name):
    spec = {spec.name: spec for spec in list_models()}[name]
    assert spec.bundled and spec.weights_available(), f"{spec.weights} is missing"
    assert load_model(name).name == name


def test_acceptance_lxmert_question_from_the_cli(star_scene, tmp_path):
    """Issue 5: `xattn relevancy --model shapes-lxmert --question "what colour is the star?" IMG`."""
    image, qa = star_scene
    completed = run(["relevancy", "--model", "shapes-lxmert", "--question", qa["question"], str(image),
                     "--out", str(tmp_path / "out")])
    assert completed.returncode == 0, completed.stderr
    (record,) = [json.loads(line) for line in completed.stdout.splitlines()]
    (target,) = record["targets"]
    assert target["answer"] in COLORS
    assert [t["token"] for t in target["tokens"]] == ["what", "colour", "is", "the", "star", "?"]
    assert all(0.0 <= t["relevance"] <= 1.0 for t in target["tokens"])
    overlay = Path(target["overlay"])
    assert overlay.is_file() and Image.open(overlay).size == Image.open(image).size
    assert records(tmp_path / "out")[0]["targets"][0]["answer"] == target["answer"]


@pytest.mark.parametrize("name", VQA_MODELS)
@pytest.mark.parametrize("method", ["chefer", "raw"])
def test_vqa_models_answer_with_the_question_kind(name, method, star_scene, tmp_path):
    image, qa = star_scene
    completed = run(["relevancy", "--model", name, "--method", method, str(image), "--question", qa["question"],
                     "--question", "what shape is red?", "--out", str(tmp_path / "out"), "--format", "jsonl"])
    assert completed.returncode == 0, completed.stderr
    colour, shape = json.loads(completed.stdout)["targets"]
    assert colour["answer"] in COLORS and shape["answer"] in SHAPES
    assert Path(colour["overlay"]).is_file() and Path(shape["overlay"]).is_file()


@pytest.mark.parametrize("method", ["chefer", "raw"])
def test_detr_detects_and_boxes_each_detection(method, star_scene, tmp_path):
    image, _ = star_scene
    completed = run(["relevancy", "--model", "shapes-detr", "--method", method, str(image), "--threshold", "0.0",
                     "--out", str(tmp_path / "out"), "--format", "jsonl"])
    assert completed.returncode == 0, completed.stderr
    record = json.loads(completed.stdout)
    assert record["method"] == method
    targets = record["targets"]
    assert targets, "threshold 0 keeps every query"
    width, height = Image.open(image).size
    for target in targets:
        x0, y0, x1, y1 = target["box"]
        assert target["label"] in SHAPES and 0 <= target["score"] <= 1
        assert -1 <= x0 < x1 <= width + 1 and -1 <= y0 < y1 <= height + 1
        assert Path(target["overlay"]).is_file()


@pytest.mark.parametrize("alias, bundled", [("lxmert", "shapes-lxmert"), ("visualbert", "shapes-visualbert"),
                                            ("detr", "shapes-detr")])
def test_aliases_fail_fast_offline_naming_the_bundled_model(alias, bundled):
    with pytest.raises(UsageError, match=bundled):
        load_model(alias)  # HF_HUB_OFFLINE is set by conftest
