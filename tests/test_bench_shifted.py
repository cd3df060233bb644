"""benchmarks/shifted.py: its scene-resampled mAP against `eval.detection`, its per-scene detection counts
against the explainer's detections, its demo questions and its shared-colour-or-shape filter."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from helpers import load_benchmark
from xattn_cli.eval.detection import mean_average_precision
from xattn_cli.explainers.detection import DetectionRelevancy
from xattn_cli.models.detr import boxes_to_pixels
from xattn_cli.models.registry import load_model

shifted = load_benchmark("shifted")


def test_per_scene_matching_gives_the_map_of_eval_detection():
    import torch

    adapter = load_model("shapes-detr", device="cpu")
    scenes = [shifted.scene(index) for index in range(6)]
    detections, truths = [], []
    for drawn in scenes:
        with torch.no_grad():
            logits, boxes = adapter.detect(adapter.preprocess([drawn.image], adapter.native_size))
        scores, labels = logits[0].softmax(dim=-1)[:, :-1].max(dim=-1)
        corners = boxes_to_pixels(boxes[0], (shifted.SIZE, shifted.SIZE)).tolist()
        detections.append(list(zip(labels.tolist(), scores.tolist(), corners)))
        truths.append([(adapter.labels.index(o.shape), o.box) for o in drawn.objects])
    expected = mean_average_precision(detections, truths, threshold=0.5)["map"]
    assert shifted.mean_ap([shifted.scene_detections(adapter, s) for s in scenes]) == pytest.approx(expected, abs=1e-9)


def test_detection_counts_are_the_explainers_detections_per_class():
    import torch

    adapter = load_model("shapes-detr", device="cpu")
    explainer = DetectionRelevancy(adapter)
    for drawn in [shifted.scene(index) for index in range(6)]:
        with torch.no_grad():
            logits, _ = adapter.detect(adapter.preprocess([drawn.image], adapter.native_size))
        labels = [label for _, label, _ in explainer.detections(logits)[0]]
        counted = shifted.count_detections(shifted.scene_detections(adapter, drawn)[0])
        assert counted == {label: labels.count(label) for label in set(labels)}


def test_demo_questions_ask_shapes_only_of_colours_one_object_has():
    questions = shifted.demo_questions([("star", "orange"), ("triangle", "purple"), ("ring", "purple")])
    assert questions == [("what colour is the star?", "orange"), ("what colour is the triangle?", "purple"),
                         ("what colour is the ring?", "purple"), ("what shape is orange?", "star")]


def test_every_object_sharing_a_colour_or_a_shape():
    def drawn(*pairs):
        return SimpleNamespace(objects=[SimpleNamespace(shape=s, color=c) for s, c in pairs])

    assert shifted.shares_colour_or_shape_everywhere(drawn(("star", "red"), ("star", "blue"), ("ring", "blue")))
    assert not shifted.shares_colour_or_shape_everywhere(drawn(("star", "red"), ("star", "blue"), ("ring", "green")))
    assert not shifted.shares_colour_or_shape_everywhere(drawn(("star", "red")))


def test_demo_masks_are_disjoint_objects_around_their_pixels():
    import numpy as np

    for name, objects in shifted.DEMO.items():
        masks = shifted.demo_masks(name)
        assert len(masks) == len(objects)
        for (_, _, (x, y)), mask in zip(objects, masks):
            assert mask[y, x] and 500 < mask.sum() < 0.5 * mask.size
        assert np.sum(masks, axis=0).max() == 1  # no pixel in two objects
