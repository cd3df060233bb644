"""Learned token masks: the pure optimiser, the explainer's budget and determinism (same seed, batch = single
runs), the binary map and overlay, `xattn mask` through a real subprocess, and its usage errors."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from xattn_cli.methods.token_mask import MaskSettings, item_seed, optimise_mask, temperature, top_k_keep

FEW_STEPS = MaskSettings(steps=12)  # mechanics, not quality


def _weights_objective(weights: torch.Tensor):
    """A toy objective: the sum of the kept patches' weights, one row per item."""
    return lambda keep: (keep * weights).sum(dim=-1)


def test_the_optimiser_keeps_the_patches_the_objective_rewards():
    weights = torch.zeros(2, 16)
    weights[0, [1, 5, 9, 13]] = 1.0
    weights[1, [0, 2, 4, 6]] = 1.0
    learned = optimise_mask(_weights_objective(weights), 16, [3, 4], MaskSettings(ratio=0.25, steps=60))
    assert learned.kept.sum(dim=-1).tolist() == [4, 4]  # exact budget
    assert learned.kept[0].nonzero().flatten().tolist() == [1, 5, 9, 13]
    assert learned.kept[1].nonzero().flatten().tolist() == [0, 2, 4, 6]
    assert ((0 <= learned.threshold_fraction) & (learned.threshold_fraction <= 1)).all()


def test_rows_are_independent_and_seeded():
    weights = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
    together = optimise_mask(_weights_objective(weights), 10, [7, 8, 9], FEW_STEPS)
    alone = [optimise_mask(_weights_objective(weights[r : r + 1]), 10, [seed], FEW_STEPS)
             for r, seed in enumerate([7, 8, 9])]
    assert torch.equal(together.margins, torch.cat([a.margins for a in alone]))
    other_seed = optimise_mask(_weights_objective(weights), 10, [1, 2, 3], FEW_STEPS)
    assert not torch.equal(together.margins, other_seed.margins)  # the noise matters: the check can fail


def test_budget_seed_and_temperature_rules():
    assert top_k_keep(torch.tensor([[0.0, 3.0, 1.0, 3.0]]), 0.5).tolist() == [[False, True, False, True]]
    assert top_k_keep(torch.zeros(1, 8), 0.01).sum() == 1  # at least one patch
    assert temperature(0, 100, (2.0, 0.2)) == 2.0 and abs(temperature(99, 100, (2.0, 0.2)) - 0.2) < 1e-12
    base = item_seed(0, b"pixels", "star")
    assert base == item_seed(0, b"pixels", "star")
    assert len({base, item_seed(1, b"pixels", "star"), item_seed(0, b"pixelz", "star"), item_seed(0, b"pixels", "circle")}) == 4


# --- the explainer on the bundled models ----------------------------------------------------------------
@pytest.fixture(scope="module")
def shapes_vit():
    from xattn_cli.models.registry import load_model

    return load_model("shapes-vit", device="cpu")


def _scenes(count: int) -> list[Image.Image]:
    from xattn_cli.world.shapes import scene_at

    return [scene_at(40_000, index, size=64).image for index in range(count)]


def _kept(explanations) -> list[list[tuple[str, list[int]]]]:
    return [[(t.target, t.extra["kept_tokens"]) for t in image_targets] for image_targets in explanations]


def test_same_seed_same_masks_and_a_batch_equals_single_runs(shapes_vit):
    from xattn_cli.explainers.mask import MaskExplainer

    images = _scenes(8)
    explainer = MaskExplainer(shapes_vit, settings=MaskSettings(steps=6), seed=0)
    batch = explainer.explain(images)
    assert _kept(batch) == _kept(explainer.explain(images))
    assert _kept(batch) == [_kept(explainer.explain([image]))[0] for image in images]
    reseeded = MaskExplainer(shapes_vit, settings=MaskSettings(steps=6), seed=1).explain(images)
    assert _kept(reseeded) != _kept(batch)  # the seed is used: the check can fail


def test_records_and_binary_maps(shapes_vit):
    from xattn_cli.explainers.mask import MaskExplainer

    image = _scenes(1)[0].resize((80, 48))
    targets = MaskExplainer(shapes_vit, targets=["circle", "star"], settings=FEW_STEPS).explain([image])[0]
    assert [t.target for t in targets] == ["circle", "star"]
    patches = shapes_vit.grid()[0] * shapes_vit.grid()[1]
    for target in targets:
        extra = target.extra
        assert extra["kept"] == round(round(0.25 * patches) / patches, 6) and len(extra["kept_tokens"]) == round(0.25 * patches)
        assert 0 <= extra["kept_threshold"] <= 1 and extra["steps"] == 12 and extra["seed"] == 0
        assert all(np.isfinite([target.score, extra["score_kept"], extra["score_removed"]]))
        assert target.map.shape == (48, 80) and target.map.dtype == np.float32
        assert set(np.unique(target.map)) == {0.0, 1.0}
        assert abs(target.map.mean() - extra["kept"]) < 0.05  # each patch covers its share of the image


def test_clip_masks_through_the_api(tmp_path):
    from xattn_cli import mask

    path = tmp_path / "scene.png"
    _scenes(1)[0].save(path)
    result = mask([path], model="shapes-clip", texts=["a red circle", "a blue star"], steps=4, device="cpu")[0]
    assert result.maps.shape == (2, 64, 64) and set(np.unique(result.maps)) <= {0.0, 1.0}
    assert all(t.extra["kept"] == 0.25 and -1 <= t.score <= 1 for t in result.targets)


# --- overlay ---------------------------------------------------------------------------------------
def test_overlay_dims_the_removed_pixels_and_outlines_the_kept():
    from xattn_cli.render.overlay import overlay_kept

    image = Image.new("RGB", (8, 6), (200, 100, 50))
    kept = np.zeros((6, 8), dtype=np.float32)
    kept[1:5, 2:7] = 1
    shown = np.asarray(overlay_kept(image, kept))
    assert tuple(shown[0, 0]) == (70, 35, 18)  # dimmed to 0.35
    assert tuple(shown[1, 2]) == (255, 255, 255)  # the border
    assert tuple(shown[2, 3]) == (200, 100, 50)  # kept, inside
    with pytest.raises(ValueError):
        overlay_kept(image, kept[:5])


# --- the command line -----------------------------------------------------------------------------------
def _run(*args: str, **kwargs):
    return subprocess.run([sys.executable, "-m", "xattn_cli", "mask", *args], capture_output=True, text=True,
                          timeout=300, **kwargs)


def test_xattn_mask_through_a_subprocess(tmp_path):
    paths = []
    for index, image in enumerate(_scenes(2)):
        paths.append(tmp_path / f"scene{index}.png")
        image.save(paths[-1])
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1"}
    completed = _run(*map(str, paths), "--model", "shapes-vit", "--keep-ratio", "0.25", "--format", "jsonl",
                     "--steps", "8", "--save-maps", "--out", str(tmp_path / "out"), env=env)
    assert completed.returncode == 0, completed.stderr
    records = [json.loads(line) for line in completed.stdout.splitlines()]
    assert [r["status"] for r in records] == ["ok", "ok"] and all(r["method"] == "mask" for r in records)
    for record in records:
        assert record["meta"]["keep_ratio"] == 0.25 and record["targets"]
        for target in record["targets"]:
            assert target["kept"] == 0.25 and target["steps"] == 8
            saved = np.load(target["map"])
            assert saved.shape == (64, 64) and set(np.unique(saved)) == {0.0, 1.0}
            assert Image.open(target["overlay"]).size == (64, 64)


@pytest.mark.parametrize("args, message", [
    (["--keep-ratio", "0"], "keep ratio must be in (0, 1]"),
    (["--text", "a red circle"], "is a classifier: give targets, not texts"),
    (["--target", "hexagon"], "unknown target 'hexagon'"),
    (["--model", "shapes-lxmert"], "has no token-mask support"),
])
def test_usage_errors_are_one_line(args, message, tmp_path):
    from typer.testing import CliRunner

    from xattn_cli.cli.app import app

    path = tmp_path / "scene.png"
    _scenes(1)[0].save(path)
    result = CliRunner().invoke(app, ["mask", str(path), *args, "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.output
