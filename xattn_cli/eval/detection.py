"""Detection quality: average precision per class at one IoU threshold (all-point interpolation, as PASCAL VOC
from 2010 on), and its mean over classes (mAP@0.5 by default).

Boxes are (x0, y0, x1, y1) in any one unit. Within an image, each class's detections are matched in order of
decreasing score, each to the unmatched ground-truth object of its class with which it has the highest IoU, if
that IoU is at least the threshold; a detection left unmatched (a duplicate, a poor box, a wrong class) is a
false positive.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

Box = Sequence[float]


def box_iou(box: Box, boxes: np.ndarray) -> np.ndarray:
    """IoU of one box with each of (N, 4) boxes. (N,)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    x0, y0 = np.maximum(box[0], boxes[:, 0]), np.maximum(box[1], boxes[:, 1])
    x1, y1 = np.minimum(box[2], boxes[:, 2]), np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = (box[2] - box[0]) * (box[3] - box[1]) + areas - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def average_precision(scores: Sequence[float], hits: Sequence[bool], truths: int) -> float:
    """All-point interpolated AP of one class: the area under its precision–recall curve after precision at each
    recall is raised to the best precision at any higher recall. `scores` and `hits` (true positive or not)
    describe every detection of the class; `truths` counts its ground-truth objects (> 0)."""
    if truths <= 0:
        raise ValueError("average precision needs at least one ground-truth object")
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    hits = np.asarray(hits, dtype=bool)[order]
    true_positives = np.cumsum(hits)
    recall = true_positives / truths
    precision = true_positives / np.arange(1, len(hits) + 1)
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    return float(np.sum(np.diff(recall, prepend=0.0) * envelope))


def match(boxes: Sequence[Box], scores: Sequence[float], truth_boxes: Sequence[Box], threshold: float) -> list[bool]:
    """Whether each detection of one class in one image is a true positive (matching in the module docstring)."""
    truth = np.asarray(truth_boxes, dtype=np.float64).reshape(-1, 4)
    free = np.ones(len(truth), dtype=bool)
    hits = [False] * len(boxes)
    for i in np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable"):
        overlaps = np.where(free, box_iou(boxes[i], truth), -1.0)
        if len(truth) and overlaps.max() >= threshold:
            free[overlaps.argmax()] = False
            hits[i] = True
    return hits


def mean_average_precision(detections: Sequence[Sequence[tuple[int, float, Box]]],
                           truths: Sequence[Sequence[tuple[int, Box]]], threshold: float = 0.5) -> dict:
    """mAP over the classes that have ground truth. `detections[i]`: (class, score, box) of image i;
    `truths[i]`: (class, box) of its objects. Detections of classes with no ground truth anywhere are ignored.
    Returns {"map": float, "ap": {class: AP}}."""
    classes = sorted({label for objects in truths for label, _ in objects})
    per_class = {}
    for label in classes:
        scores, hits, count = [], [], 0
        for found, objects in zip(detections, truths):
            mine = [(score, box) for c, score, box in found if c == label]
            truth_boxes = [box for c, box in objects if c == label]
            scores += [score for score, _ in mine]
            hits += match([box for _, box in mine], [score for score, _ in mine], truth_boxes, threshold)
            count += len(truth_boxes)
        per_class[label] = average_precision(scores, hits, count)
    return {"map": float(np.mean(list(per_class.values()))) if per_class else 0.0, "ap": per_class}
