"""The shapes world: determinism and ground truth that agrees with the pixels."""
from __future__ import annotations

import numpy as np
import pytest

from xattn_cli.world.shapes import COLOR_RGB, COLORS, SHAPES, make_scene, scene_at


def test_scenes_are_a_pure_function_of_seed_and_index():
    first, again, other = scene_at(7, 3), scene_at(7, 3), scene_at(7, 4)
    assert np.array_equal(np.asarray(first.image), np.asarray(again.image))
    assert first.captions == again.captions and first.qa == again.qa
    assert not np.array_equal(np.asarray(first.image), np.asarray(other.image))


@pytest.mark.parametrize("index", range(30))
def test_masks_boxes_and_colours_agree(index):
    scene = scene_at(11, index, size=96)
    pixels = np.asarray(scene.image).astype(float)
    assert 1 <= len(scene.objects) <= 4
    assert len({(o.shape, o.color) for o in scene.objects}) == len(scene.objects)
    for obj in scene.objects:
        assert obj.shape in SHAPES and obj.color in COLORS
        ys, xs = np.nonzero(obj.mask)
        assert obj.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        mean = pixels[obj.mask].mean(axis=0)
        nearest = min(COLORS, key=lambda c: np.linalg.norm(mean - np.array(COLOR_RGB[c])))
        assert nearest == obj.color
    for i, a in enumerate(scene.objects):  # occlusion is resolved: masks are disjoint
        for b in scene.objects[i + 1:]:
            assert not (a.mask & b.mask).any()


def test_questions_have_unambiguous_answers():
    for index in range(40):
        scene = scene_at(2, index)
        for item in scene.qa:
            if item["question"].startswith("what colour is the "):
                shape = item["question"].removeprefix("what colour is the ").rstrip("?")
                assert [o.color for o in scene.objects if o.shape == shape] == [item["answer"]]
            elif item["question"].startswith("is there"):
                words = item["question"].rstrip("?").split()
                present = any(o.color == words[-2] and o.shape == words[-1] for o in scene.objects)
                assert item["answer"] == ("yes" if present else "no")


def test_shared_attributes_happen_and_confounding_biases_colour():
    rng = np.random.default_rng(0)
    shared = sum(
        len({o.color for o in s.objects}) < len(s.objects) or len({o.shape for o in s.objects}) < len(s.objects)
        for s in (make_scene(rng, size=32, n_objects=3) for _ in range(60)))
    assert shared > 20
    biased = [make_scene(rng, size=32, n_objects=1, color_bias=1.0).objects[0] for _ in range(20)]
    assert all(COLORS.index(o.color) == SHAPES.index(o.shape) for o in biased)


def test_export_writes_the_dataset_folder_format(tmp_path):
    import json

    from PIL import Image
    from typer.testing import CliRunner

    from xattn_cli.cli.app import app

    result = CliRunner().invoke(app, ["world", "export", str(tmp_path / "data"), "--n", "5", "--seed", "3",
                                      "--size", "64"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (tmp_path / "data" / "annotations.jsonl").read_text().splitlines()]
    assert [line["id"] for line in lines] == [f"{i:06d}" for i in range(5)]
    for line in lines:
        scene = scene_at(3, int(line["id"]), size=64)
        assert np.array_equal(np.asarray(Image.open(tmp_path / "data" / line["image"])), np.asarray(scene.image))
        assert line["captions"] == scene.captions and line["size"] == [64, 64]
        for record, obj in zip(line["objects"], scene.objects):
            mask = np.asarray(Image.open(tmp_path / "data" / record["mask"])) > 0
            assert np.array_equal(mask, obj.mask) and record["box"] == list(obj.box)
            assert (record["shape"], record["color"]) == (obj.shape, obj.color)
