"""`xattn relevancy` through CliRunner: classifiers, CLIP texts, HF folders, timm names, usage errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from xattn_cli.cli.app import app
from xattn_cli.train import shapes_vit
from xattn_cli.world.shapes import scene_at

runner = CliRunner()
VIT_SCENE = 2  # of shapes-vit's held-out stream: three shapes, each predicted, nothing else (picked by running it)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "scene.png"
    scene_at(8, 0, size=96, n_objects=2, distinct_shapes=True).image.save(path)
    return path


@pytest.fixture
def held_out(tmp_path: Path):
    """A scene of shapes-vit's own benchmark stream (as its `evaluate` draws them), saved as PNG."""
    scene = scene_at(shapes_vit.EVAL_SEED, VIT_SCENE, size=64, n_objects=1 + VIT_SCENE % 3, distinct_shapes=True)
    path = tmp_path / "held-out.png"
    scene.image.save(path)
    return path, scene


def invoke(image: Path, tmp_path: Path, *args: str):
    return runner.invoke(app, ["relevancy", str(image), "-o", str(tmp_path / "out"), "-f", "jsonl", "--save-maps",
                               *args])


@pytest.mark.parametrize("method", ["chefer", "rollout", "raw", "attn-gradcam"])
def test_default_classifier_explains_its_predictions(held_out, tmp_path, method):
    image, scene = held_out
    result = invoke(image, tmp_path, "--method", method)
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["model"] == "shapes-vit" and record["method"] == method
    present = sorted(o.shape for o in scene.objects)
    assert sorted(t["label"] for t in record["targets"]) == present  # the predicted set is the scene's
    for target in record["targets"]:
        assert target["target"] == target["label"]
        assert 0.5 < target["probability"] <= 1 and target["predicted"] in present
        heat = np.load(target["map"])
        assert heat.shape == (64, 64) and heat.dtype == np.float32 and 0 <= heat.min() <= heat.max() <= 1


def test_explicit_targets_by_label_and_index(image, tmp_path):
    result = invoke(image, tmp_path, "--target", "star", "--target", "0")
    assert result.exit_code == 0, result.output
    assert [t["label"] for t in json.loads(result.stdout)["targets"]] == ["star", "circle"]


def test_clip_relevancy_gives_token_relevance(image, tmp_path):
    result = invoke(image, tmp_path, "--model", "shapes-clip", "--text", "a red circle", "--text", "a blue star")
    assert result.exit_code == 0, result.output
    targets = json.loads(result.stdout)["targets"]
    assert [t["target"] for t in targets] == ["a red circle", "a blue star"]
    for target in targets:
        assert [t["token"] for t in target["tokens"]] == target["target"].split()
        relevances = [t["relevance"] for t in target["tokens"]]
        assert max(relevances) == 1 and min(relevances) >= 0  # the rule of every model: the top token is 1


@pytest.mark.parametrize("args, message", [
    (["--target", "hexagon"], "unknown target"),
    (["--text", "a star"], "--target"),
    (["--model", "shapes-clip"], "--text"),
    (["--model", "shapes-clip", "--text", "x", "--target", "star"], "--target is for classifiers"),
    (["--method", "nope"], "--method"),
    (["--model", "vit"], "shapes-vit"),
])
def test_usage_errors(image, tmp_path, args, message):
    result = invoke(image, tmp_path, *args)
    assert result.exit_code == 2
    assert message in result.output


def test_hf_vit_folder_and_timm_name(image, tmp_path):
    import transformers

    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64, num_labels=3,
                                    id2label={0: "cat", 1: "dog", 2: "owl"}, label2id={"cat": 0, "dog": 1, "owl": 2})
    torch.manual_seed(0)
    transformers.ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    result = invoke(image, tmp_path, "--model", f"hf:{tmp_path / 'vit'}", "--target", "owl")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["targets"][0]["label"] == "owl"
    result = invoke(image, tmp_path, "--model", "timm:vit_tiny_patch16_224", "--method", "rollout")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["model"] == "timm:vit_tiny_patch16_224"


@pytest.mark.parametrize("name, pool", [("test_vit2", "avg"), ("test_vit3", "map")])
def test_timm_vits_that_pool_their_tokens_are_refused_not_explained_at_a_patch(image, tmp_path, name, pool):
    result = invoke(image, tmp_path, "--model", f"timm:{name}", "--method", "rollout")
    assert result.exit_code == 2 and f"global_pool '{pool}'" in result.output, result.output
    assert "Traceback" not in result.output and not list(tmp_path.glob("**/*.npy"))


def test_precision_reaches_the_record_and_fp16_needs_cuda(image, tmp_path):
    result = invoke(image, tmp_path, "--precision", "bf16", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["meta"]["precision"] == "bf16"
    result = invoke(image, tmp_path, "--precision", "fp16", "--device", "cpu")
    assert result.exit_code == 2 and "fp16 needs CUDA" in result.output


def test_two_methods_share_one_out_folder(image, tmp_path):
    """A second method into the same folder is not 'done' under --resume and does not overwrite the first
    method's files: artifact names carry the model and method, --resume is per model and method."""
    chefer = invoke(image, tmp_path, "--target", "star")
    rollout = invoke(image, tmp_path, "--target", "star", "--method", "rollout", "--resume")
    assert chefer.exit_code == 0 and rollout.exit_code == 0, rollout.output
    (first,), (second,) = json.loads(chefer.stdout)["targets"], json.loads(rollout.stdout)["targets"]
    assert first["map"] != second["map"] and first["overlay"] != second["overlay"]
    assert not np.array_equal(np.load(first["map"]), np.load(second["map"]))
    again = invoke(image, tmp_path, "--target", "star", "--resume")  # chefer again: done, nothing rerun
    assert again.exit_code == 0 and again.stdout == "" and "skipped 1" in again.stderr
