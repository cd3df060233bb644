"""The bundled shapes-lxmert, shapes-visualbert, shapes-detr and shapes-catt, offline, through the real CLI; and the
lxmert, visualbert and detr aliases, which fail fast without a hub and name the bundled model.

Quality (held-out accuracy, mAP, pointing) is measured by `benchmarks/shapes_multimodal.py`; here the
shipped folders load and explain end to end, and give the scene's true answers on held-out scenes of their
own benchmark streams that they answer right (picked once by running the models; the expected answers come
from the scenes). The subprocesses inherit HF_HUB_OFFLINE=1 from conftest: every run is offline."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from test_cli import records, run
from xattn_cli.errors import UsageError
from xattn_cli.models.registry import list_models, load_model
from xattn_cli.train import shapes_detr, shapes_vqa
from xattn_cli.world.shapes import SHAPES, scene_at

VQA_MODELS = ("shapes-lxmert", "shapes-visualbert")
VQA_SCENE = 15  # of the VQA held-out stream: four objects, one a star; both models answer both questions right
DETR_SCENE = 7  # of the DETR held-out stream: a cross, a square and a star, each detected once
SIZE = 64  # the models' input size, as in their benchmarks


@pytest.fixture(scope="module")
def star_scene(tmp_path_factory) -> tuple[Path, dict, dict]:
    """A held-out VQA scene with exactly one star, saved as PNG: its question about the star's colour and
    its question about the shape of one colour."""
    scene = scene_at(shapes_vqa.EVAL_SEED, VQA_SCENE, size=SIZE)
    (colour,) = [qa for qa in scene.qa if qa["question"] == "what colour is the star?"]
    shape = next(qa for qa in scene.qa if qa["question"].startswith("what shape is"))
    path = tmp_path_factory.mktemp("scene") / "star.png"
    scene.image.save(path)
    return path, colour, shape


@pytest.mark.parametrize("name", [*VQA_MODELS, "shapes-detr", "shapes-catt", "shapes-catt-base"])
def test_bundled_folders_are_registered_and_shipped(name):
    spec = {spec.name: spec for spec in list_models()}[name]
    assert spec.bundled and spec.weights_available(), f"{spec.weights} is missing"
    assert load_model(name).name == name


def test_acceptance_lxmert_question_from_the_cli(star_scene, tmp_path):
    """Issue 5: `xattn relevancy --model shapes-lxmert --question "what colour is the star?" IMG`."""
    image, qa, _ = star_scene
    completed = run(["relevancy", "--model", "shapes-lxmert", "--question", qa["question"], str(image),
                     "--out", str(tmp_path / "out")])
    assert completed.returncode == 0, completed.stderr
    (record,) = [json.loads(line) for line in completed.stdout.splitlines()]
    (target,) = record["targets"]
    assert target["answer"] == qa["answer"]
    assert [t["token"] for t in target["tokens"]] == ["what", "colour", "is", "the", "star", "?"]
    assert all(0.0 <= t["relevance"] <= 1.0 for t in target["tokens"])
    overlay = Path(target["overlay"])
    assert overlay.is_file() and Image.open(overlay).size == Image.open(image).size
    assert records(tmp_path / "out")[0]["targets"][0]["answer"] == target["answer"]


def test_acceptance_catt_question_reaches_dictionary_entries(star_scene, tmp_path):
    """Issue 17: `xattn relevancy IMG --model shapes-catt --question "what colour is the star?"` offline: the
    answer, the region map, question-token relevance and the top dictionary entries with their relevance,
    sizes and member regions (from the bundled dictionary file, which the record's meta names)."""
    from xattn_cli.dictionary import load_dictionary

    image, qa, _ = star_scene
    completed = run(["relevancy", "--model", "shapes-catt", "--question", qa["question"], str(image),
                     "--out", str(tmp_path / "out"), "--format", "jsonl", "--save-maps"])
    assert completed.returncode == 0, completed.stderr
    record = json.loads(completed.stdout)
    (target,) = record["targets"]
    assert target["answer"] == qa["answer"]
    assert [t["token"] for t in target["tokens"]] == ["what", "colour", "is", "the", "star", "?"]
    assert Path(target["overlay"]).is_file() and Path(target["map"]).is_file()
    dictionary = load_dictionary(record["meta"]["dictionary"])
    assert Path(record["meta"]["dictionary"]).parent.name == "shapes-catt"
    entries = target["dictionary"]
    assert len(entries) == 5 and 0 < target["dictionary_share"] < 1
    assert [e["relevance"] for e in entries] == sorted((e["relevance"] for e in entries), reverse=True)
    for entry in entries:
        assert entry["count"] == int(dictionary.counts[entry["entry"]])
        rows = dictionary.members[entry["entry"]].tolist()
        assert [(m["image"], m["region"]) for m in entry["members"]] == [(dictionary.names[r], i) for r, i in rows]


def test_dictionary_built_on_a_world_export_runs_in_shapes_catt(star_scene, tmp_path):
    """Issue 17: `xattn dictionary build` on a `world export` folder writes a file shapes-catt loads with
    `--dictionary`; the record's entries then come from that file."""
    image, qa, _ = star_scene
    assert run(["world", "export", str(tmp_path / "data"), "--n", "20", "--seed", "5", "--size", "64"]).returncode == 0
    built = run(["dictionary", "build", str(tmp_path / "data"), "--model", "shapes-catt", "--k", "64",
                 "--out", str(tmp_path / "d.safetensors")])
    assert built.returncode == 0, built.stderr
    assert json.loads(built.stdout.splitlines()[-1])["points"] == 20 * 64
    completed = run(["relevancy", "--model", "shapes-catt", "--question", qa["question"], str(image),
                     "--dictionary", str(tmp_path / "d.safetensors"), "--out", str(tmp_path / "out"), "--format",
                     "jsonl"])
    assert completed.returncode == 0, completed.stderr
    record = json.loads(completed.stdout)
    assert Path(record["meta"]["dictionary"]) == (tmp_path / "d.safetensors").resolve()
    names = {member["image"] for entry in record["targets"][0]["dictionary"] for member in entry["members"]}
    assert names and names <= {path.name for path in (tmp_path / "data" / "images").iterdir()}


@pytest.mark.parametrize("name", VQA_MODELS)
@pytest.mark.parametrize("method", ["chefer", "raw"])
def test_vqa_models_answer_right(name, method, star_scene, tmp_path):
    image, colour_qa, shape_qa = star_scene
    completed = run(["relevancy", "--model", name, "--method", method, str(image), "--question", colour_qa["question"],
                     "--question", shape_qa["question"], "--out", str(tmp_path / "out"), "--format", "jsonl"])
    assert completed.returncode == 0, completed.stderr
    colour, shape = json.loads(completed.stdout)["targets"]
    assert colour["answer"] == colour_qa["answer"] and shape["answer"] == shape_qa["answer"]
    assert Path(colour["overlay"]).is_file() and Path(shape["overlay"]).is_file()


@pytest.mark.parametrize("method", ["chefer", "raw"])
def test_detr_detects_and_boxes_each_detection(method, star_scene, tmp_path):
    image, _, _ = star_scene
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


def test_detr_finds_the_scene_objects(tmp_path):
    """At the default threshold, one detection per object, of the right shape, its box on the object."""
    scene = scene_at(shapes_detr.EVAL_SEED, DETR_SCENE, size=SIZE)
    image = tmp_path / "scene.png"
    scene.image.save(image)
    completed = run(["relevancy", "--model", "shapes-detr", str(image), "--out", str(tmp_path / "out"),
                     "--format", "jsonl"])
    assert completed.returncode == 0, completed.stderr
    targets = json.loads(completed.stdout)["targets"]
    assert sorted(t["label"] for t in targets) == sorted(o.shape for o in scene.objects)
    for target in targets:
        assert max(_iou(target["box"], o.box) for o in scene.objects if o.shape == target["label"]) > 0.5


def _iou(a, b) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.mark.parametrize("alias, bundled", [("lxmert", "shapes-lxmert"), ("visualbert", "shapes-visualbert"),
                                            ("detr", "shapes-detr")])
def test_aliases_fail_fast_offline_naming_the_bundled_model(alias, bundled):
    with pytest.raises(UsageError, match=bundled):
        load_model(alias)  # HF_HUB_OFFLINE is set by conftest
