"""benchmarks/mask.py: on one held-out scene per model, its attention masking scores the learned masks exactly as
`xattn mask` records them, Chefer's selection has the same budget, and mask.md's tables render its JSON."""
from __future__ import annotations

import pytest

from helpers import load_benchmark
from xattn_cli.eval.quality import ClassifierTask, ClipTask
from xattn_cli.methods.token_mask import MaskSettings


@pytest.fixture
def few_steps(monkeypatch):
    """Masks after 4 steps: the benchmark's bookkeeping, not the masks' quality."""
    for kind in (ClassifierTask, ClipTask):
        def explainer(self, method, targets, original=kind.explainer):
            chosen = original(self, method, targets)
            if method == "mask":
                chosen.settings = MaskSettings(steps=4)
            return chosen

        monkeypatch.setattr(kind, "explainer", explainer)


@pytest.mark.parametrize("model", ["shapes-vit", "shapes-clip"])
def test_one_scene_scores_the_masks_as_xattn_mask_records_them(model, few_steps):
    mask = load_benchmark("mask")
    figures = mask.measure(model, 1, log=lambda line: None)
    assert figures["recorded_score_difference"] < 1e-5
    assert figures["targets"] >= 2 and 0 <= figures["decided"] <= figures["targets"]
    for selection in mask.SELECTIONS:
        for metric in ("sufficiency_all", "pointing", "recall", "precision"):
            interval = figures[selection][metric]
            assert 0 <= interval["low"] <= interval["mean"] <= interval["high"] <= 1


def test_chefer_selection_has_the_masks_budget(few_steps):
    mask = load_benchmark("mask")
    from xattn_cli.eval.metrics import pool_to_tokens
    from xattn_cli.eval.quality import held_out_scenes, scene_targets
    from xattn_cli.methods.token_mask import top_k_keep
    from xattn_cli.models.registry import load_model

    task = ClassifierTask(load_model("shapes-vit", device="cpu"), [], "attention")
    _, scene = held_out_scenes(1)[0]
    names = [name for name, _ in scene_targets(scene, task.target_of)]
    heatmap = task.maps("chefer", scene.image, names)[0]
    kept = top_k_keep(pool_to_tokens(heatmap, task.grid)[None], mask.SETTINGS.ratio)[0]
    relevance = pool_to_tokens(heatmap, task.grid)
    assert int(kept.sum()) == 16 and relevance[kept].min() >= relevance[~kept].max()


def test_mask_md_renders_bars_and_intervals_from_the_json():
    cards = load_benchmark("cards")
    model = {"targets": 10, "decided": 8, "elapsed_s": 12.0, "recorded_score_difference": 1e-7,
             "sufficiency_gain": {"mean": 0.1, "low": 0.0, "high": 0.2},
             "sufficiency_all_gain": {"mean": 0.1, "low": 0.0, "high": 0.2},
             "kept_threshold": {"mean": 0.2, "low": 0.18, "high": 0.22},
             **{selection: {metric: {"mean": 0.9, "low": 0.8, "high": 1.0} for metric in
                            ("sufficiency", "sufficiency_all", "complement", "pointing", "recall", "precision")}
                for selection in ("mask", "chefer")}}
    result = {"scenes": 5, "keep_ratio": 0.25, "steps": 100, "seed": 0,
              "models": {"shapes-vit": model, "shapes-clip": model}}
    vit = cards.CARDS["benchmarks/mask.md"]["shapes-vit"][1](result)
    assert "| sufficiency: the kept patches alone keep the logit > 0 | **0.900 [0.800, 1.000]** (target ≥ 0.95: " \
           "**not met**) | 0.900 [0.800, 1.000] |" in vit
    assert "**0.100 [0.000, 0.200]** (target ≥ 0.15: **not met**)" in vit
    assert "(target ≥ 0.85) |" in vit  # complement 0.9 meets its bar
    clip = cards.CARDS["benchmarks/mask.md"]["shapes-clip"][1](result)
    assert "(every caption) | **0.900 [0.800, 1.000]** (target ≥ 0.85) |" in clip
    assert "5 scenes, 10 targets, 8 captions ranked first with every patch" in clip
