"""Average precision on hand-built boxes whose AP is known."""
from __future__ import annotations

import numpy as np
import pytest

from xattn_cli.eval.detection import average_precision, box_iou, match, mean_average_precision

A, B = (0, 0, 10, 10), (20, 20, 30, 30)


def test_box_iou():
    np.testing.assert_allclose(box_iou(A, [A, B, (5, 0, 15, 10), (0, 0, 0, 0)]), [1.0, 0.0, 50 / 150, 0.0])


def test_all_point_interpolation_of_a_known_curve():
    # hits by score: TP, FP, TP of 2 objects → (recall, precision) (.5, 1), (.5, .5), (1, 2/3)
    # envelope: precision 1 up to recall .5, then 2/3 → AP = .5 · 1 + .5 · 2/3
    assert average_precision([0.9, 0.8, 0.7], [True, False, True], 2) == pytest.approx(0.5 + 1 / 3)
    # the same detections in another order: AP depends on scores, not on list order
    assert average_precision([0.7, 0.9, 0.8], [True, True, False], 2) == pytest.approx(0.5 + 1 / 3)


def test_misses_and_an_empty_list():
    assert average_precision([0.9], [True], 2) == pytest.approx(0.5)  # one of two objects found, at the top
    assert average_precision([0.9, 0.8], [False, True], 1) == pytest.approx(0.5)  # a false positive ranked first
    assert average_precision([], [], 3) == 0.0
    with pytest.raises(ValueError):
        average_precision([0.5], [False], 0)


def test_matching_takes_each_object_once_and_needs_the_threshold():
    # a duplicate of a found object is a false positive; the higher score keeps the match
    assert match([A, A], [0.6, 0.9], [A], 0.5) == [False, True]
    # IoU 1/3 < 0.5: a false positive; at 0.3 it matches
    assert match([(5, 0, 15, 10)], [0.9], [A], 0.5) == [False]
    assert match([(5, 0, 15, 10)], [0.9], [A], 0.3) == [True]
    # the best-overlapping unmatched object is taken, leaving the other for the next detection
    assert match([(0, 0, 10, 10), (1, 0, 11, 10)], [0.9, 0.8], [(1, 0, 11, 10), (0, 0, 10, 10)], 0.5) == [True, True]
    assert match([A], [0.9], [], 0.5) == [False]


def test_mean_over_classes_with_matching_per_image():
    truths = [[(0, A), (1, B)], [(0, A)]]
    detections = [
        [(0, 0.9, A), (1, 0.8, B), (2, 0.99, A)],  # class 2 has no ground truth: ignored
        [(0, 0.95, B), (1, 0.7, A)],  # class 0 box in the wrong place; class 1 where image 1 has none
    ]
    result = mean_average_precision(detections, truths)
    # class 0: by score FP (0.95), TP (0.9) of 2 objects → AP = .5 · .5; class 1: TP (0.8), FP (0.7) of 1 → 1
    assert result["ap"] == pytest.approx({0: 0.25, 1: 1.0})
    assert result["map"] == pytest.approx(0.625)
    assert mean_average_precision([[(0, 1.0, A)]], [[(0, A)]])["map"] == 1.0


def test_a_right_box_with_the_wrong_class_counts_for_neither():
    result = mean_average_precision([[(1, 0.9, A)]], [[(0, A), (1, B)]])
    assert result["ap"] == {0: 0.0, 1: 0.0}
