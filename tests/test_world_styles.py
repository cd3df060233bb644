"""World styles (classic | varied | shifted): classic is the original renderer bit for bit, the styled renderers
are deterministic, differ from each other, and keep exact ground truth (visible masks, boxes, colours, qa)."""
from __future__ import annotations

import colorsys
import dataclasses
import hashlib
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from xattn_cli.errors import UsageError
from xattn_cli.world import shapes
from xattn_cli.world.shapes import (COLOR_RGB, COLORS, HUE_JITTER, MIN_VISIBLE, SHAPES, USUAL_COLOUR, ColourRule,
                                    scene_at)

# sha256 of everything in these scenes (images, masks, boxes, shapes, colours, captions, qa), computed with
# xattn_cli/world/shapes.py as of commit f317e40, before styles existed: the classic world must not move
BEFORE_STYLES = "8f3098428e64468e355aff20212f4e23ce81d2f23b353bd724cd8bdeb5265583"
CLASSIC_CASES = [
    (0, 64, {}), (3, 224, {"color_bias": 0.9}), (5, 48, {"distinct_shapes": True, "n_objects": 3}),
    (7, 32, {"colour_rule": ColourRule.parse("anti")}),
    (9, 96, {"colour_rule": ColourRule.parse("biased:0.9"), "share_prob": 0.8}),
]
STYLED = ("varied", "shifted")


def _digest(**style) -> str:
    digest = hashlib.sha256()
    for seed, size, kwargs in CLASSIC_CASES:
        for index in range(12):
            scene = scene_at(seed, index, size=size, **kwargs, **style)
            digest.update(scene.image.tobytes())
            for obj in scene.objects:
                digest.update(np.packbits(obj.mask).tobytes())
                digest.update(json.dumps([obj.k, obj.shape, obj.color, list(obj.box)]).encode())
            digest.update(json.dumps([scene.captions, scene.qa]).encode())
    return digest.hexdigest()


def test_classic_is_the_world_as_it_was():
    assert _digest() == BEFORE_STYLES
    assert _digest(style="classic") == BEFORE_STYLES


@pytest.mark.parametrize("style", STYLED)
def test_styled_scenes_are_a_pure_function_of_seed_and_index(style):
    first, again, other = (scene_at(4, index, size=64, style=style) for index in (2, 2, 3))
    assert first.image.tobytes() == again.image.tobytes() and first.qa == again.qa
    assert all(np.array_equal(a.mask, b.mask) for a, b in zip(first.objects, again.objects))
    assert first.image.tobytes() != other.image.tobytes()


def test_styles_draw_the_same_objects_differently():
    for index in range(10):
        scenes = {style: scene_at(6, index, size=64, style=style) for style in ("classic", *STYLED)}
        images = [np.asarray(scene.image) for scene in scenes.values()]
        assert all(not np.array_equal(a, b) for i, a in enumerate(images) for b in images[i + 1:])
        pairs = [[(o.shape, o.color) for o in scene.objects] for scene in scenes.values()]
        assert pairs[0] == pairs[1] == pairs[2]  # a style changes the rendering, never the attributes


def test_unknown_style_is_refused():
    with pytest.raises(UsageError, match="unknown style 'fancy'"):
        scene_at(0, 0, style="fancy")


def test_colour_name_hue_windows_are_disjoint():
    hues = sorted(colorsys.rgb_to_hls(*(c / 255 for c in COLOR_RGB[name]))[0] for name in COLORS)
    gaps = np.diff(hues + [hues[0] + 1])  # circular
    assert gaps.min() > 2 * HUE_JITTER


def _hue_distance(a: float, b: float) -> float:
    return min(abs(a - b), 1 - abs(a - b))


def _interior(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    """The mask less `steps` pixels of its edge (4-neighbour erosion)."""
    inside = mask.copy()
    for _ in range(steps):
        padded = np.pad(inside, 1)
        inside = inside & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return inside


def _check_questions(scene) -> None:
    for item in scene.qa:
        question = item["question"].rstrip("?")
        if question.startswith("what colour is the "):
            shape = question.removeprefix("what colour is the ")
            assert [o.color for o in scene.objects if o.shape == shape] == [item["answer"]]
        elif question.startswith("what shape is "):
            color = question.removeprefix("what shape is ")
            assert [o.shape for o in scene.objects if o.color == color] == [item["answer"]]
        else:
            color, shape = question.split()[-2:]
            present = any((o.color, o.shape) == (color, shape) for o in scene.objects)
            assert item["answer"] == ("yes" if present else "no")
        if item["object"] is not None:
            assert scene.objects[item["object"]].k == item["object"]


@pytest.fixture
def render(monkeypatch):
    """scene_at that also returns the coverages (before occlusion) its visible masks were computed from."""
    visible_masks, recorded = shapes._visible_masks, []

    def spy(coverages):
        recorded.append([coverage.copy() for coverage in coverages])
        return visible_masks(coverages)

    monkeypatch.setattr(shapes, "_visible_masks", spy)

    def rendered(*args, **kwargs):
        recorded.clear()
        scene = scene_at(*args, **kwargs)
        return scene, recorded[-1]  # the last geometry drawn is the one accepted
    return rendered


@pytest.mark.parametrize("style", STYLED)
@pytest.mark.parametrize("size", [40, 96])
def test_styled_ground_truth_agrees_with_the_pixels(style, size, render):
    checked = objects = 0
    for index in range(60):
        scene, coverages = render(21, index, size=size, style=style)
        pixels = np.asarray(scene.image).astype(np.float32) / 255
        assert 1 <= len(scene.objects) <= 4
        assert len({(o.shape, o.color) for o in scene.objects}) == len(scene.objects)
        for obj, coverage in zip(scene.objects, coverages, strict=True):
            objects += 1
            assert obj.shape in SHAPES and obj.color in COLORS and obj.mask.any()
            assert obj.mask.sum() >= MIN_VISIBLE * (coverage > 0.5).sum()  # occlusion leaves most in view
            assert not (obj.mask & (coverage <= 0.5)).any()  # the mask never leaves the object
            ys, xs = np.nonzero(obj.mask)
            assert obj.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            inside = _interior(obj.mask)
            if inside.sum() >= 4:  # thin parts are all edge: anti-aliasing and outlines mix their colour
                checked += 1
                hue, _, saturation = colorsys.rgb_to_hls(*np.median(pixels[inside], axis=0))
                nominal = colorsys.rgb_to_hls(*(c / 255 for c in COLOR_RGB[obj.color]))[0]
                assert _hue_distance(hue, nominal) <= HUE_JITTER + 0.01 and saturation > 0.3
        for i, a in enumerate(scene.objects):  # visible masks are disjoint
            for b in scene.objects[i + 1:]:
                assert not (a.mask & b.mask).any()
        _check_questions(scene)
    assert checked >= 0.8 * objects


@pytest.mark.parametrize("style", STYLED)
@pytest.mark.parametrize("spacing", [None, 0.2])  # the style's own, and crowded enough for the bound to bind
def test_objects_overlap_but_stay_in_view(style, spacing, render, monkeypatch):
    if spacing is not None:
        monkeypatch.setitem(shapes.STYLES, style, dataclasses.replace(shapes.STYLES[style], spacing=spacing))
    hidden = []  # share of each object's own mask that later objects cover
    for index in range(40):
        scene, coverages = render(8, index, size=64, n_objects=4, style=style)
        hidden += [1 - obj.mask.sum() / (coverage > 0.5).sum() for obj, coverage in zip(scene.objects, coverages)]
    assert max(hidden) <= 1 - MIN_VISIBLE and sum(share > 0.1 for share in hidden) >= 5


@pytest.mark.parametrize("style", STYLED)
def test_colour_rules_hold_in_every_style(style):
    anti = [scene_at(3, index, size=32, colour_rule=ColourRule.parse("anti"), style=style) for index in range(60)]
    assert not any(o.color == USUAL_COLOUR[o.shape] for scene in anti for o in scene.objects)
    usual = [scene_at(3, index, size=32, colour_rule=ColourRule.parse("biased:1"), style=style) for index in range(30)]
    assert all(o.color == USUAL_COLOUR[o.shape] for scene in usual for o in scene.objects)


def test_export_with_a_style(tmp_path):
    from xattn_cli.cli.app import app
    from xattn_cli.eval.quality import load_dataset

    runner = CliRunner()
    result = runner.invoke(app, ["world", "export", str(tmp_path / "shifted"), "--n", "6", "--seed", "2", "--size", "48",
                                 "--style", "shifted"])
    assert result.exit_code == 0, result.output
    loaded = load_dataset(tmp_path / "shifted")
    assert [ident for ident, _ in loaded] == [f"{i:06d}" for i in range(6)]
    for ident, read in loaded:
        scene = scene_at(2, int(ident), size=48, style="shifted")
        assert np.array_equal(np.asarray(read.image), np.asarray(scene.image))
        assert read.qa == scene.qa and read.captions == scene.captions
        for got, obj in zip(read.objects, scene.objects, strict=True):
            assert np.array_equal(got.mask, obj.mask) and got.box == obj.box
            assert (got.shape, got.color) == (obj.shape, obj.color)
    result = runner.invoke(app, ["world", "export", str(tmp_path / "bad"), "--n", "2", "--style", "fancy"])
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and "unknown style" in result.output
    assert not (tmp_path / "bad").exists()
