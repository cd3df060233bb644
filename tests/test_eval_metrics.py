"""Faithfulness metrics on hand-built maps and masks whose answers are known."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from xattn_cli.eval.metrics import (PERTURBATION_STEPS, area_under_curve, bootstrap_ci, energy_in_mask, keep_masks,
                                    mean_threshold_miou, object_patches, perturbation_auc, pointing, pool_to_tokens,
                                    recall_precision, remove_tokens, spearman)

MASK = np.zeros((8, 8), dtype=bool)
MASK[2:6, 1:5] = True  # 16 of 64 pixels: area fraction 0.25
PERFECT = MASK.astype(np.float32)
INVERTED = 1 - PERFECT
UNIFORM = np.full((8, 8), 0.3, dtype=np.float32)


def test_pointing_of_perfect_inverted_and_uniform_maps():
    assert pointing(PERFECT, MASK) == 1.0
    assert pointing(INVERTED, MASK) == 0.0
    assert pointing(UNIFORM, MASK) == 0.25  # every pixel ties: the chance of a random tie-break
    assert pointing(np.zeros((8, 8)), MASK) == 0.25


def test_pointing_counts_a_single_peak_exactly():
    heatmap = np.zeros((8, 8))
    heatmap[3, 2] = 1.0
    assert pointing(heatmap, MASK) == 1.0
    heatmap[3, 2], heatmap[7, 7] = 0.5, 0.9
    assert pointing(heatmap, MASK) == 0.0


def test_miou_of_perfect_inverted_and_uniform_maps():
    assert mean_threshold_miou(PERFECT, MASK) == 1.0
    assert mean_threshold_miou(INVERTED, MASK) == 0.0
    # no foreground: IoU_fg = 0, IoU_bg = |background| / |image| = 0.75
    assert mean_threshold_miou(UNIFORM, MASK) == pytest.approx(0.375)


def test_miou_thresholds_at_the_mean():
    heatmap = PERFECT * 0.6 + 0.2  # mean 0.35: exactly the mask is above it
    assert mean_threshold_miou(heatmap, MASK) == 1.0
    half = np.zeros((8, 8), dtype=np.float32)
    half[2:6, 1:3] = 1.0  # half the object: fg IoU 8/16, bg IoU 48/56
    assert mean_threshold_miou(half, MASK) == pytest.approx((8 / 16 + 48 / 56) / 2)


def test_energy_in_mask_of_perfect_inverted_and_uniform_maps():
    assert energy_in_mask(PERFECT, MASK) == 1.0
    assert energy_in_mask(INVERTED, MASK) == 0.0
    assert energy_in_mask(UNIFORM, MASK) == pytest.approx(0.25)
    assert energy_in_mask(np.zeros((8, 8)), MASK) == 0.25
    weighted = PERFECT * 3 + INVERTED * 1  # 16·3 inside, 48·1 outside
    assert energy_in_mask(weighted, MASK) == pytest.approx(48 / 96)


def test_pool_to_tokens_averages_each_patch_row_major():
    heatmap = np.zeros((8, 8), dtype=np.float32)
    heatmap[0:4, 4:8] = 1.0  # top-right patch of a 2x2 grid
    heatmap[4:8, 0:2] = 1.0  # half of the bottom-left patch
    assert pool_to_tokens(heatmap, (2, 2)).tolist() == [0.0, 1.0, 0.5, 0.0]


def test_object_patches_recall_and_precision_equal_a_literal_count():
    rng = np.random.default_rng(3)
    grid, patch = (3, 4), 5
    mask = rng.random((15, 20)) < 0.3  # (H, W) = grid × patch
    kept = torch.as_tensor(rng.random(12) < 0.5)
    on_object, expected = object_patches(mask, grid), []
    for row in range(3):
        for col in range(4):
            inside = mask[row * patch:(row + 1) * patch, col * patch:(col + 1) * patch].sum()
            expected.append(inside / patch**2 >= 0.25)
    assert on_object.tolist() == expected and 0 < sum(expected) < 12
    hits = sum(k and o for k, o in zip(kept.tolist(), expected))
    recall, precision = recall_precision(kept, on_object)
    assert (recall, precision) == pytest.approx((hits / sum(expected), hits / int(kept.sum())))
    assert object_patches(mask, grid, min_share=0.0).all()
    with pytest.raises(ValueError, match="object patch"):
        recall_precision(kept, torch.zeros(12, dtype=torch.bool))


def test_keep_masks_remove_in_relevance_order():
    relevance = torch.tensor([0.1, 0.4, 0.3, 0.2])
    positive = keep_masks(relevance, (0.0, 0.25, 0.5, 1.0), most_relevant_first=True)
    assert positive.tolist() == [[True] * 4, [True, False, True, True], [True, False, False, True], [False] * 4]
    negative = keep_masks(relevance, (0.0, 0.25, 0.5, 1.0), most_relevant_first=False)
    assert negative.tolist() == [[True] * 4, [False, True, True, True], [False, True, True, False], [False] * 4]


def test_area_under_curve_is_the_trapezoid_on_the_step_grid():
    assert area_under_curve((0, 1), (1, 1)) == 1.0
    assert area_under_curve((0, 0.5, 1), (1, 0, 0)) == 0.25
    assert area_under_curve(PERTURBATION_STEPS, [2.0] * len(PERTURBATION_STEPS)) == pytest.approx(2.0)


class PatchSum(torch.nn.Module):
    """Toy model: its score is the sum of each patch's (constant) brightness over a 2x2 grid of 4x4 patches."""

    def forward(self, pixels):  # (S, 1, 8, 8)
        return pixels.sum(dim=(1, 2, 3)) / 16  # (S,)


def toy_image(weights):
    cells = torch.tensor(weights, dtype=torch.float32).view(1, 1, 2, 2)  # (1, 1, 2, 2)
    return torch.nn.functional.interpolate(cells, size=(8, 8), mode="nearest")[0]  # (1, 8, 8)


def test_perturbation_auc_on_a_toy_model_with_a_known_answer():
    weights = [0.4, 0.3, 0.2, 0.1]
    model, pixels = PatchSum(), toy_image(weights)
    steps = (0.0, 0.25, 0.5, 0.75, 1.0)

    def score(keep):
        return model(remove_tokens(pixels, keep, (2, 2), torch.zeros(1)))

    truth = torch.tensor(weights)
    # most relevant first: scores 1.0, 0.6, 0.3, 0.1, 0 → 0.25·(0.8 + 0.45 + 0.2 + 0.05)
    assert perturbation_auc(truth, score, True, steps) == pytest.approx(0.375)
    # least relevant first: 1.0, 0.9, 0.7, 0.4, 0 → 0.25·(0.95 + 0.8 + 0.55 + 0.2)
    assert perturbation_auc(truth, score, False, steps) == pytest.approx(0.625)
    assert perturbation_auc(-truth, score, True, steps) == pytest.approx(0.625)  # an inverted map
    uniform = torch.zeros(4)
    assert perturbation_auc(uniform, score, True, steps) == perturbation_auc(uniform, score, False, steps)


def test_remove_tokens_fills_removed_patches_with_the_fill_value():
    pixels = torch.ones(3, 4, 6)  # a 2x3 grid of 2x2 patches
    keep = torch.tensor([[True, False, True, True, True, False]])
    out = remove_tokens(pixels, keep, (2, 3), torch.tensor([-1.0, -2.0, -3.0]))
    assert out.shape == (1, 3, 4, 6)
    assert out[0, :, 0:2, 2:4].flatten(1).tolist() == [[-1.0] * 4, [-2.0] * 4, [-3.0] * 4]
    assert out[0, :, 2:4, 4:6].eq(torch.tensor([-1.0, -2.0, -3.0]).view(3, 1, 1)).all()
    assert (out[0, :, :, 0:2] == 1).all()


def test_perturbation_of_the_bundled_steps_keeps_all_then_none():
    keep = keep_masks(torch.arange(64.0), PERTURBATION_STEPS, most_relevant_first=True)
    assert keep.sum(dim=1).tolist() == [64, 48, 32, 16, 13, 10, 6, 3, 0]


def test_bootstrap_interval_brackets_the_mean_and_shrinks_with_more_data():
    assert bootstrap_ci([0.5] * 20) == (0.5, 0.5)
    small = np.tile([0.0, 1.0], 10)
    large = np.tile([0.0, 1.0], 1000)
    low, high = bootstrap_ci(small)
    assert low < 0.5 < high
    assert 0.2 < low and high < 0.8  # ±1.96·sqrt(0.25/20) ≈ ±0.22
    low_large, high_large = bootstrap_ci(large)
    assert high_large - low_large < (high - low) / 5
    assert bootstrap_ci(small, seed=3) == bootstrap_ci(small, seed=3)
    with pytest.raises(ValueError):
        bootstrap_ci([])


def test_spearman_of_known_orderings():
    a = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    assert spearman(a, a**3) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    # ranks (0, 1, 2, 3) vs (1, 0, 3, 2): 1 − 6·Σd²/(n(n²−1)) = 1 − 6·4/60
    assert spearman([1, 2, 3, 4], [2, 1, 4, 3]) == pytest.approx(0.6)
    # ties share the average rank: (0.5, 0.5, 2) vs (0, 1, 2)
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(np.corrcoef([0.5, 0.5, 2], [0, 1, 2])[0, 1])
    assert spearman(np.ones(4), np.ones(4)) == 1.0
    assert spearman(np.ones(4), a[:4]) == 0.0
