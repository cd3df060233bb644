"""`xattn relevancy` on LXMERT, VisualBERT and DETR `hf:DIR` folders (tiny random models): questions,
answers, region features from --features, one target per detection, overlays, and usage errors.

Every run is checked against the library explainer called directly on the same folder and image."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from test_cli import records, run
from test_coattention_reference import ANSWERS, CELL, QUESTIONS, _adapter, tokenizer  # noqa: F401 (fixture)
from test_multimodal_models import _save
from xattn_cli.cli.app import app

runner = CliRunner()
SIZE = 64


@pytest.fixture(scope="module")
def folders(tokenizer, tmp_path_factory) -> dict[str, Path]:
    """`save_pretrained` folders: lxmert and visualbert with grid regions, detr, and lxmert without regions."""
    root = tmp_path_factory.mktemp("models")
    saved = {}
    for family in ("lxmert", "visualbert", "detr"):
        _save(family, _adapter(family, tokenizer), tokenizer, root / family)
        saved[family] = root / family
    bare = _adapter("lxmert", tokenizer)
    bare.model.save_pretrained(root / "lxmert-bare")
    tokenizer.save_pretrained(root / "lxmert-bare")
    saved["lxmert-bare"] = root / "lxmert-bare"
    return saved


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    from xattn_cli.world.shapes import scene_at

    paths = [tmp_path / "first.png", tmp_path / "second.png"]
    for i, path in enumerate(paths):
        scene_at(4, i, size=SIZE, n_objects=2).image.save(path)
    return paths


def invoke(tmp_path: Path, *args: str):
    return runner.invoke(app, ["relevancy", "-o", str(tmp_path / "out"), "-f", "jsonl", "--save-maps", *map(str, args)])


def direct(folder: Path, image: Path, **options):
    """What the library explainer gives for one image, called without the CLI."""
    from xattn_cli.explainers.detection import DetectionRelevancy
    from xattn_cli.explainers.vqa import VqaRelevancy
    from xattn_cli.models.registry import load_model

    adapter = load_model(f"hf:{folder}")
    if adapter.family == "detr":
        return DetectionRelevancy(adapter, **options).explain([Image.open(image)])[0]
    return VqaRelevancy(adapter, **options).explain([Image.open(image)], names=[str(image)])[0]


def assert_map_file(target: dict, expected: np.ndarray) -> None:
    heat = np.load(target["map"])
    assert heat.shape == (SIZE, SIZE) and heat.dtype == np.float32 and 0 <= heat.min() <= heat.max() <= 1
    np.testing.assert_allclose(heat, expected, atol=1e-6)
    with Image.open(target["overlay"]) as overlay:
        assert overlay.size == (SIZE, SIZE)


@pytest.mark.parametrize("family", ["lxmert", "visualbert"])
def test_questions_give_answers_tokens_overlays_and_maps(folders, images, tmp_path, family):
    questions = QUESTIONS[:2]
    result = invoke(tmp_path, images[0], "--model", f"hf:{folders[family]}", "--question", questions[0],
                    "--question", questions[1])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["status"] == "ok" and record["method"] == "chefer" and record["size"] == [SIZE, SIZE]
    expected = direct(folders[family], images[0], questions=questions)
    assert [t["question"] for t in record["targets"]] == questions
    for target, want in zip(record["targets"], expected):
        assert target["answer"] in ANSWERS and target["answer"] == target["predicted"] == want.extra["answer"]
        assert target["score"] == pytest.approx(want.score, abs=1e-5)
        assert [t["token"] for t in target["tokens"]] == target["question"].split()
        assert all(0 <= t["relevance"] <= 1 for t in target["tokens"])
        assert max(t["relevance"] for t in target["tokens"]) == 1  # one rule for every model: the top token is 1
        assert target["tokens"] == want.extra["tokens"]
        assert_map_file(target, want.map)


@pytest.mark.parametrize("family", ["lxmert", "visualbert"])
def test_a_question_without_question_mark_keeps_its_last_word(folders, images, tmp_path, family):
    """VisualBERT's head pools the token before [SEP]: the "?" or, without one, the last word, still listed."""
    result = invoke(tmp_path, images[0], "--model", f"hf:{folders[family]}", "--question", "what colour is the star")
    assert result.exit_code == 0, result.output
    (target,) = json.loads(result.stdout)["targets"]
    assert [t["token"] for t in target["tokens"]] == ["what", "colour", "is", "the", "star"]
    pooled = [t["token"] for t in target["tokens"] if t.get("pooled")]  # VisualBERT's row is its last word's
    assert pooled == (["star"] if family == "visualbert" else [])


def test_answer_option_explains_that_answer(folders, images, tmp_path):
    result = invoke(tmp_path, images[0], "--model", f"hf:{folders['lxmert']}", "--question", QUESTIONS[0],
                    "--answer", "star")
    assert result.exit_code == 0, result.output
    (target,) = json.loads(result.stdout)["targets"]
    (want,) = direct(folders["lxmert"], images[0], questions=QUESTIONS[:1], answer="star")
    assert target["answer"] == "star" and target["index"] == ANSWERS.index("star")
    assert target["score"] == pytest.approx(want.score, abs=1e-5)
    assert_map_file(target, want.map)


def test_detr_one_target_per_detection_with_boxed_overlays(folders, images, tmp_path):
    from xattn_cli.render.overlay import overlay_heatmap
    from xattn_cli.runner import detection_boxes
    from xattn_cli.results import TargetMap

    result = invoke(tmp_path, images[0], "--model", f"hf:{folders['detr']}", "--threshold", "0")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    expected = direct(folders["detr"], images[0], threshold=0.0)
    assert len(record["targets"]) == len(expected) == 6  # threshold 0: every query of the tiny model
    image = Image.open(images[0]).convert("RGB")
    boxes_visible = []
    for target, want in zip(record["targets"], expected):
        assert (target["target"], target["label"], target["box"]) == (want.target, want.extra["label"],
                                                                       want.extra["box"])
        assert target["score"] == pytest.approx(want.score, abs=1e-6) and target["peak"] == want.peak
        assert_map_file(target, want.map)
        with_box = np.asarray(overlay_heatmap(image, want.map, boxes=detection_boxes(want)))
        np.testing.assert_array_equal(np.asarray(Image.open(target["overlay"])), with_box)
        boxes_visible.append((with_box != np.asarray(overlay_heatmap(image, want.map))).any())
    assert any(boxes_visible)
    assert detection_boxes(TargetMap("x", 1.0, want.map)) == []  # other models' overlays: no box


def test_detr_without_detections_is_an_ok_record_with_no_targets(folders, images, tmp_path):
    result = invoke(tmp_path, images[0], "--model", f"hf:{folders['detr']}", "--threshold", "1")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["status"] == "ok" and record["targets"] == [] and record["meta"]["threshold"] == 1.0


def test_table_shows_the_answer_and_images_without_detections(folders, images, tmp_path):
    def table(*args: str) -> str:
        result = runner.invoke(app, ["relevancy", str(images[0]), "-o", str(tmp_path / "out"), "-f", "table", *args],
                               env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        return result.stdout

    shown = table("--model", f"hf:{folders['lxmert']}", "--question", QUESTIONS[0], "--answer", "star")
    assert f"{QUESTIONS[0]} → star" in shown
    record = json.loads(invoke(tmp_path, images[0], "--model", f"hf:{folders['lxmert']}", "--question", QUESTIONS[0],
                               "--answer", "star").stdout)
    relevances = " ".join(f"{t['token']} {t['relevance']:.2f}" for t in record["targets"][0]["tokens"])
    assert relevances.startswith("what ") and relevances in shown  # the question's token relevances
    assert "(none)" in table("--model", f"hf:{folders['detr']}", "--threshold", "1")


def _write_features(path: Path, names: list[str]) -> np.ndarray:
    """Two real regions and one padded row per image, boxes in pixels. Returns the boxes (K, 3, 4)."""
    rng = np.random.default_rng(0)
    boxes = np.tile(np.array([[0, 0, 40, 32], [20, 16, 64, 64], [0, 0, 0, 0]], np.float32), (len(names), 1, 1))
    np.savez(path, names=np.array(names), features=rng.normal(size=(len(names), 3, 3 * CELL * CELL)).astype(np.float32),
             boxes=boxes, counts=np.full(len(names), 2))
    return boxes


def test_features_file_gives_region_boxes_and_a_painted_map(folders, images, tmp_path):
    from xattn_cli.models.regions import NpzRegions

    features = tmp_path / "regions.npz"
    boxes = _write_features(features, ["first"])
    result = invoke(tmp_path, images[0], "--model", f"hf:{folders['lxmert-bare']}", "--question", QUESTIONS[0],
                    "--features", features)
    assert result.exit_code == 0, result.output
    (target,) = json.loads(result.stdout)["targets"]
    assert [r["box"] for r in target["regions"]] == boxes[0, :2].tolist()
    (want,) = direct(folders["lxmert-bare"], images[0], questions=QUESTIONS[:1], regions=NpzRegions(features))
    assert target["tokens"] == want.extra["tokens"]
    assert_map_file(target, want.map)


def test_precomputed_regions_need_the_image_names(folders, images, tmp_path):
    from xattn_cli.explainers.vqa import VqaRelevancy
    from xattn_cli.models.regions import NpzRegions
    from xattn_cli.models.registry import load_model

    features = tmp_path / "regions.npz"
    _write_features(features, ["first"])
    explainer = VqaRelevancy(load_model(f"hf:{folders['lxmert-bare']}"), QUESTIONS[:1], regions=NpzRegions(features))
    with pytest.raises(ValueError, match="names="):
        explainer.explain([Image.open(images[0])])


def test_image_missing_from_features_file_is_an_error_record(folders, images, tmp_path):
    features = tmp_path / "regions.npz"
    _write_features(features, ["first"])
    result = invoke(tmp_path, *images, "--model", f"hf:{folders['lxmert']}", "--question", QUESTIONS[0],
                    "--features", features)
    assert result.exit_code == 1
    by_image = {Path(r["image"]).name: r for r in records(tmp_path / "out")}
    assert by_image["first.png"]["status"] == "ok"
    assert by_image["second.png"]["status"] == "error"
    assert by_image["second.png"]["error"]["type"] == "MissingFeatures"


@pytest.mark.parametrize("family, args, message", [
    ("lxmert", [], "needs --question"),
    ("lxmert-bare", ["--question", "what shape ?"], "--features"),
    ("lxmert", ["--question", "what shape ?", "--features", "missing.npz"], "cannot read region features"),
    ("lxmert", ["--question", "what shape ?", "--features", "{not_npz}"], "cannot read region features"),
    ("lxmert", ["--question", "what shape ?", "--features", "{truncated}"], "cannot read region features"),
    ("lxmert", ["--question", "what shape ?", "--features", "{empty}"], "cannot read region features"),
    ("lxmert", ["--question", "what shape ?", "--answer", "purple"], "unknown answer"),
    ("lxmert", ["--question", "what shape ?", "--text", "a star"], "--text is for CLIP models"),
    ("lxmert", ["--question", "what shape ?", "--method", "rollout"], "supports --method chefer, raw, attn-gradcam, not 'rollout'"),
    ("visualbert", ["--question", "what shape ?", "--threshold", "0.3"], "--threshold is for detection"),
    ("visualbert", ["--question", "what shape ?", "--precision", "bf16"], "--precision is for ViT and CLIP"),
    ("detr", ["--text", "a star"], "--text is for CLIP models"),
    ("detr", ["--question", "what shape ?"], "--question is for VQA models"),
    ("detr", ["--method", "rollout"], "supports --method chefer, raw, attn-gradcam, not 'rollout'"),
    ("shapes-vit", ["--question", "what shape ?"], "--question is for VQA models"),
])
def test_usage_errors_are_one_line(folders, images, tmp_path, family, args, message):
    not_npz, truncated, empty = tmp_path / "regions.npz", tmp_path / "truncated.npz", tmp_path / "empty.npz"
    not_npz.write_text("not an npz file")
    np.savez(truncated, names=np.array(["a"]), features=np.zeros((1, 2, 4)), boxes=np.zeros((1, 2, 4)))
    truncated.write_bytes(truncated.read_bytes()[:100])  # a download cut short
    empty.write_bytes(b"")
    model = family if family == "shapes-vit" else f"hf:{folders[family]}"
    args = [arg.format(not_npz=not_npz, truncated=truncated, empty=empty) for arg in args]
    result = invoke(tmp_path, images[0], "--model", model, *args)
    assert result.exit_code == 2, result.output
    (error,) = result.stderr.splitlines()
    assert error.startswith("xattn: error:") and message in error
    assert "Traceback" not in result.output
    assert not (tmp_path / "out" / "results.jsonl").exists()


def test_subprocess_question_run(folders, images, tmp_path):
    completed = run(["relevancy", str(images[0]), "--model", f"hf:{folders['lxmert']}",
                     "--question", QUESTIONS[0], "--out", str(tmp_path / "out")])
    assert completed.returncode == 0, completed.stderr
    assert "Traceback" not in completed.stderr
    (target,) = json.loads(completed.stdout)["targets"]  # a pipe: jsonl by default
    assert target["answer"] in ANSWERS and [t["token"] for t in target["tokens"]] == QUESTIONS[0].split()
    assert Path(target["overlay"]).is_file() and target["map"] is None
