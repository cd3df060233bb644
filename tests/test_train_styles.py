"""Every training recipe draws its training scenes in `--style` and its held-out scenes in `--eval-style`: the
defaults are the classic renderer's streams, `varied` draws other (repeatable) pixels, and `--style shifted`
(kept for model selection and cards) is refused in one line."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from xattn_cli.models.base import normalize
from xattn_cli.models.regions import GridRegions
from xattn_cli.world.shapes import ColourRule, scene_at

MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
SIZE, FIRST, COUNT = 32, 3, 3  # scenes 3, 4, 5 of each stream: batch 1 of batch size 3
GRID = GridRegions((4, 4), 8)
RULE = ColourRule.parse("biased:0.9")


def _stream(seed: int, style: str = "classic", **kwargs) -> list[np.ndarray]:
    return [np.asarray(scene_at(seed, index, size=SIZE, style=style, **kwargs).image)
            for index in range(FIRST, FIRST + COUNT)]


def _vqa(**style):
    from xattn_cli.train.shapes_vqa import training_batch

    return training_batch(1, COUNT, GRID, SIZE, **style)[0]


def _catt(**style):
    from xattn_cli.train.shapes_catt import scene_image

    return np.stack([np.asarray(scene_image(f"train-3/{index}", SIZE, RULE, **style))
                     for index in range(FIRST, FIRST + COUNT)])


def _detr(**style):
    from xattn_cli.train.shapes_detr import training_batch

    return training_batch(1, COUNT, SIZE, MEAN, STD, (2, 2), **style)[0]


def _clip(**style):
    from xattn_cli.text import ensemble_templates
    from xattn_cli.train.shapes_clip import training_batch

    return training_batch(1, COUNT, SIZE, ensemble_templates(), **style)[0]


def _vit(**style):
    from xattn_cli.train.shapes_vit import scene_batch

    return scene_batch(2, FIRST, COUNT, SIZE, {"preprocess": {"mean": MEAN, "std": STD}}, **style)[0]


DRAW = {"vqa": _vqa, "catt": _catt, "detr": _detr, "clip": _clip, "vit": _vit}


def _classic(recipe: str):
    """The recipe's batch 1 built straight from `scene_at(..., style="classic")`."""
    if recipe == "vqa":
        return GRID.pixels([scene_at(3, index, size=SIZE, style="classic").image for index in range(3, 6)])
    if recipe == "catt":
        return np.stack(_stream(3, colour_rule=RULE))
    if recipe == "detr":
        return normalize(np.stack(_stream(4)), MEAN, STD)
    if recipe == "vit":
        images = [np.asarray(scene_at(2, index, size=SIZE, n_objects=1 + index % 3, distinct_shapes=True,
                                      style="classic").image) for index in range(FIRST, FIRST + COUNT)]
        return normalize(np.stack(images), MEAN, STD)
    return None  # clip: the object count is drawn per scene, see the test


@pytest.mark.parametrize("recipe", DRAW)
def test_default_batch_is_the_classic_stream(recipe):
    drawn = DRAW[recipe]()
    if recipe == "clip":
        for index, image in zip(range(FIRST, FIRST + COUNT), drawn):
            assert any(np.array_equal(image, scene_at(1, index, size=SIZE, n_objects=count, style="classic").image)
                       for count in range(1, 5)), index
    else:
        torch.testing.assert_close(torch.as_tensor(drawn), torch.as_tensor(_classic(recipe)), rtol=0, atol=0)


@pytest.mark.parametrize("recipe", DRAW)
def test_varied_batch_differs_and_repeats(recipe):
    varied = torch.as_tensor(DRAW[recipe](style="varied"))
    assert varied.shape == torch.as_tensor(DRAW[recipe]()).shape
    assert not torch.equal(varied, torch.as_tensor(DRAW[recipe]()))
    assert torch.equal(varied, torch.as_tensor(DRAW[recipe](style="varied")))


def test_held_out_sets_follow_the_eval_style():
    from xattn_cli.train import shapes_detr, shapes_vqa

    vqa = {style: shapes_vqa.HeldOut(GRID, COUNT, SIZE, style).pixels for style in ("classic", "shifted")}
    detr = {style: shapes_detr.HeldOut(COUNT, SIZE, MEAN, STD, style).pixels for style in ("classic", "shifted")}
    classic = [scene_at(12_000, index, size=SIZE, style="classic").image for index in range(COUNT)]
    assert torch.equal(shapes_vqa.HeldOut(GRID, COUNT, SIZE).pixels, GRID.pixels(classic))
    assert torch.equal(vqa["classic"], GRID.pixels(classic)) and not torch.equal(vqa["shifted"], vqa["classic"])
    classic = [np.asarray(scene_at(13_000, index, size=SIZE, style="classic").image) for index in range(COUNT)]
    assert torch.equal(shapes_detr.HeldOut(COUNT, SIZE, MEAN, STD).pixels, normalize(np.stack(classic), MEAN, STD))
    assert not torch.equal(detr["shifted"], detr["classic"])


@pytest.mark.parametrize("recipe, arguments", [
    ("shapes_vqa", ["--family", "lxmert", "--out", "{tmp}"]), ("shapes_detr", ["--out", "{tmp}"]),
    ("shapes_catt", ["--out", "{tmp}"]), ("shapes_clip", ["--work", "{tmp}"]), ("shapes_vit", ["--work", "{tmp}"])])
def test_training_on_the_shifted_style_is_refused(tmp_path, capsys, recipe, arguments):
    import importlib

    module = importlib.import_module(f"xattn_cli.train.{recipe}")
    with pytest.raises(SystemExit) as exit_:
        module.main([argument.format(tmp=tmp_path / "run") for argument in arguments] + ["--style", "shifted"])
    assert exit_.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and "shifted is for model selection and cards only" in errors[0]
    assert not (tmp_path / "run").exists()
