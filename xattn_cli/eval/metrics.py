"""Faithfulness metrics (DESIGN §6): pure functions of maps, masks, token relevances and score functions.

Maps are (H, W) arrays with values ≥ 0 (the explainers' maps are in [0, 1]); masks are (H, W) bool arrays
of the same size. A constant map, the all-zero map of a degenerate explanation included, points nowhere:
every metric treats it as uniform.

Perturbation follows reference/chefer-relevancy.md §4: tokens are removed in the steps of §4.1 (fraction
removed), most relevant first (positive: lower AUC is better) or least relevant first (negative: higher
is better); removal blanks a token's patch on the un-normalised image, as §4.4 zeroes pixels; the curve's
area is the trapezoid rule on the non-uniform step grid.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

PERTURBATION_STEPS = (0.0, 0.25, 0.5, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0)  # fraction of tokens removed (§4.1)


def pointing(heatmap: np.ndarray, mask: np.ndarray) -> float:
    """Pointing game: 1 when the map's maximum lies inside the mask, else 0.

    Tied maxima count in proportion (the expected hit of a uniformly random tie-break), so a uniform
    map scores the mask's area fraction and never wins by where `argmax` happens to look first.
    """
    peaks = heatmap == heatmap.max()
    return float(mask[peaks].mean())


def mean_threshold_miou(heatmap: np.ndarray, mask: np.ndarray) -> float:
    """mIoU of the map thresholded at its mean (foreground = map > mean) against the mask (reference §4.3):
    the mean of the foreground IoU and the background IoU. A constant map has no foreground."""
    constant = heatmap.max() == heatmap.min()
    foreground = np.zeros_like(mask) if constant else heatmap > heatmap.mean()
    return (_iou(foreground, mask) + _iou(~foreground, ~mask)) / 2


def _iou(predicted: np.ndarray, truth: np.ndarray) -> float:
    union = np.logical_or(predicted, truth).sum()
    return float(np.logical_and(predicted, truth).sum() / union) if union else 1.0


def energy_in_mask(heatmap: np.ndarray, mask: np.ndarray) -> float:
    """Share of the map's total mass that lies inside the mask; an all-zero map counts as uniform."""
    total = float(heatmap.sum())
    if total <= 0:
        return float(mask.mean())
    return float(heatmap[mask].sum()) / total


def pool_to_tokens(heatmap: np.ndarray, grid: tuple[int, int]) -> torch.Tensor:
    """(H, W) map → (gh·gw,) relevance per patch token: the map's mean over each patch, row-major."""
    image = torch.as_tensor(np.asarray(heatmap, dtype=np.float32))[None, None]  # (1, 1, H, W)
    return F.adaptive_avg_pool2d(image, grid).flatten()  # (gh·gw,)


def object_patches(mask: np.ndarray, grid: tuple[int, int], min_share: float = 0.25) -> torch.Tensor:
    """(H, W) bool mask → (gh·gw,) bool: the patches with at least `min_share` of their pixels inside it."""
    return pool_to_tokens(mask.astype(np.float32), grid) >= min_share


def recall_precision(kept: torch.Tensor, on_object: torch.Tensor) -> tuple[float, float]:
    """(N,) bool kept patches and (N,) bool object patches → (share of the object's patches kept, share of the
    kept patches on the object). Raises ValueError when either set is empty."""
    if not kept.any() or not on_object.any():
        raise ValueError("recall and precision need a kept patch and an object patch")
    hits = float((kept & on_object).sum())
    return hits / float(on_object.sum()), hits / float(kept.sum())


def keep_masks(relevance: torch.Tensor, steps: Sequence[float], most_relevant_first: bool) -> torch.Tensor:
    """(N,) relevance → (S, N) bool: the tokens kept at each step, round(step·N) removed in relevance order.

    The sort is stable, so tied tokens go in index order in both directions.
    """
    order = torch.argsort(relevance, descending=most_relevant_first, stable=True)  # (N,)
    keep = torch.ones(len(steps), relevance.numel(), dtype=torch.bool)  # (S, N)
    for row, fraction in enumerate(steps):
        keep[row, order[: int(round(fraction * relevance.numel()))]] = False
    return keep


def remove_tokens(pixels: torch.Tensor, keep: torch.Tensor, grid: tuple[int, int], fill: torch.Tensor) -> torch.Tensor:
    """One copy of the image per row of `keep`, with the patches of removed tokens set to `fill`.

    Args:
        pixels: (C, H, W) model input; patches tile it on `grid`, row-major.
        keep: (S, gh·gw) bool.
        fill: (C,) the removed value in the model's input space (black: −mean/std after normalising).
    Returns:
        (S, C, H, W).
    """
    steps = keep.shape[0]
    kept = keep.reshape(steps, 1, *grid).to(pixels.dtype)  # (S, 1, gh, gw)
    kept = F.interpolate(kept, size=pixels.shape[-2:], mode="nearest")  # (S, 1, H, W)
    return pixels[None] * kept + fill.view(1, -1, 1, 1) * (1 - kept)  # (S, C, H, W)


def area_under_curve(steps: Sequence[float], scores: Sequence[float]) -> float:
    """Trapezoid rule on the (possibly non-uniform) step grid."""
    x, y = np.asarray(steps, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2))


def perturbation_auc(relevance: torch.Tensor, score: Callable[[torch.Tensor], torch.Tensor],
                     most_relevant_first: bool, steps: Sequence[float] = PERTURBATION_STEPS) -> float:
    """Area under the target-score curve as tokens are removed in relevance order.

    Args:
        relevance: (N,) one value per token.
        score: (S, N) bool keep masks → (S,) target scores of the model on the perturbed inputs.
        most_relevant_first: True for positive perturbation, False for negative.
    """
    scores = score(keep_masks(relevance, steps, most_relevant_first))  # (S,)
    return area_under_curve(steps, torch.as_tensor(scores).detach().cpu().numpy())


def bootstrap_ci(values: Sequence[float], resamples: int = 1000, confidence: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (seeded, so runs repeat exactly)."""
    sample = np.asarray(values, dtype=np.float64)
    if sample.size == 0:
        raise ValueError("bootstrap of an empty sample")
    draws = np.random.default_rng(seed).integers(0, sample.size, size=(resamples, sample.size))  # (R, n)
    means = sample[draws].mean(axis=1)  # (R,)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def spearman(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """Spearman rank correlation of two equally long vectors (tied values share their average rank).

    Two constant vectors count as unchanged (1.0); one constant vector as uncorrelated (0.0).
    """
    ranks_a, ranks_b = _ranks(np.asarray(a).ravel()), _ranks(np.asarray(b).ravel())
    ranks_a, ranks_b = ranks_a - ranks_a.mean(), ranks_b - ranks_b.mean()
    norm = np.sqrt((ranks_a**2).sum() * (ranks_b**2).sum())
    if norm == 0:
        return float(not ranks_a.any() and not ranks_b.any())
    return float((ranks_a * ranks_b).sum() / norm)


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 0..n−1, ties averaged."""
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[np.argsort(values, kind="stable")] = np.arange(values.size)
    _, group, counts = np.unique(values, return_inverse=True, return_counts=True)
    return (np.bincount(group, weights=ranks) / counts)[group]
