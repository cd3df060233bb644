"""Measure the bundled `shapes-vit`: per-shape accuracy and the pointing game of each relevancy method.

    python benchmarks/shapes_vit.py [--weights FILE] [--scenes 300]

Accuracy: held-out scenes with 1–3 objects of distinct shapes; a shape counts as predicted when its
logit is positive; per-shape accuracy averages the six binary decisions, exact-set accuracy needs all
six right. Pointing: held-out 2–3-object scenes; for every shape present, the map for that class
(`--target`) must peak inside that object's mask. Class-agnostic baselines (raw, rollout) give every
class the same map, so they can find at most one object per scene.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from _report import report
from xattn_cli.config import load_config
from xattn_cli.eval.metrics import pointing
from xattn_cli.eval.quality import ClassifierTask, scene_targets
from xattn_cli.methods import method_names
from xattn_cli.models.bundled import shapes_vit
from xattn_cli.train.shapes_vit import evaluate
from xattn_cli.world.shapes import SHAPES, scene_at

HELD_OUT = 21_000


def pointing_game(adapter, method: str, scenes: int) -> float:
    task = ClassifierTask(adapter, SHAPES)
    hits = []
    for i in range(scenes):
        scene = scene_at(HELD_OUT, i, size=64, n_objects=2 + i % 2, distinct_shapes=True)
        targets = scene_targets(scene, task.target_of)
        maps = task.maps(method, scene.image, [name for name, _ in targets])
        hits += [pointing(heatmap, mask) for (_, mask), heatmap in zip(targets, maps)]
    return float(np.mean(hits))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights")
    parser.add_argument("--scenes", type=int, default=300)
    parser.add_argument("--json")
    args = parser.parse_args()
    adapter = shapes_vit(args.weights)
    figures = evaluate(adapter.model, load_config("shapes-vit"), n=2 * args.scenes)
    for method in method_names("relevancy", "self"):
        figures[f"pointing_{method}"] = pointing_game(adapter, method, args.scenes)
    report(figures, args.json)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
