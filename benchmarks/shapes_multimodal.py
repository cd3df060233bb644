"""Measure the bundled `shapes-lxmert`, `shapes-visualbert` and `shapes-detr`: the held-out figure each was
trained for, and the pointing game of each relevancy method.

    python benchmarks/shapes_multimodal.py [--models shapes-lxmert,shapes-visualbert,shapes-detr]
                                           [--scenes 300] [--json FILE]

With `--json` naming an existing file, the models measured replace their figures and the others keep theirs.

VQA (LXMERT, VisualBERT): answer accuracy on every question of the recipe's 500 held-out scenes. Pointing:
a second held-out stream; every question about one object ("what colour is the star?", "what shape is
red?", "is there a red star?" when there is) is explained for the answer the model gives, and the image
map must peak inside that object's mask; also over the questions the model answered right.

DETR: mAP@0.5 on the recipe's 500 held-out scenes. Pointing: every detection above the CLI's default
threshold on the second stream; its map must peak inside its own predicted box.

Methods: chefer (the rules), raw (last-layer attention), attn-gradcam (last layer, gradient-weighted heads).
Tied peaks count in proportion (`xattn_cli.eval.metrics.pointing`).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from _report import report
from xattn_cli.config import load_config
from xattn_cli.eval.metrics import pointing
from xattn_cli.explainers.detection import DetectionRelevancy
from xattn_cli.explainers.vqa import VqaRelevancy
from xattn_cli.methods import method_names
from xattn_cli.models.registry import load_model
from xattn_cli.world.shapes import scene_at

POINTING_SEED = 23_000  # neither a training stream nor a recipe's held-out stream
SIZE = 64  # the models' input size


def vqa_accuracy(adapter) -> dict[str, float]:
    from xattn_cli.train.shapes_vqa import HeldOut, evaluate

    return evaluate(adapter, HeldOut(adapter.regions, 500, SIZE))


def vqa_pointing(adapter, method: str, scenes: int) -> tuple[list[float], list[bool]]:
    """Per question about one object: the pointing hit, and whether the model answered it right."""
    hits, right = [], []
    for index in range(scenes):
        scene = scene_at(POINTING_SEED, index, size=SIZE)
        about_one = [qa for qa in scene.qa if qa["object"] is not None]
        targets = VqaRelevancy(adapter, [qa["question"] for qa in about_one], method=method).explain([scene.image])[0]
        hits += [pointing(target.map, scene.objects[qa["object"]].mask) for qa, target in zip(about_one, targets)]
        right += [target.extra["answer"] == qa["answer"] for qa, target in zip(about_one, targets)]
    return hits, right


def detr_map(adapter) -> dict[str, float]:
    from xattn_cli.train.shapes_detr import HeldOut, evaluate

    preprocess = load_config("shapes-detr")["preprocess"]
    return evaluate(adapter, HeldOut(500, SIZE, preprocess["mean"], preprocess["std"]))


def detr_pointing(adapter, method: str, scenes: int) -> tuple[list[float], list[bool]]:
    """Per detection: the pointing hit (and True: a detection has no answer to get wrong)."""
    hits = []
    explainer = DetectionRelevancy(adapter, method=method)
    rows, cols = np.mgrid[:SIZE, :SIZE]  # (H, W) pixel indices
    for index in range(scenes):
        image = scene_at(POINTING_SEED, index, size=SIZE).image
        for target in explainer.explain([image])[0]:
            x0, y0, x1, y1 = target.extra["box"]
            inside = (cols + 0.5 >= x0) & (cols + 0.5 <= x1) & (rows + 0.5 >= y0) & (rows + 0.5 <= y1)  # pixel centres
            hits.append(pointing(target.map, inside))
    return hits, [True] * len(hits)


def measure(name: str, scenes: int) -> dict[str, float]:
    adapter = load_model(name)
    detector = adapter.layout.task == "detect"
    figures = {f"{name} {key}": value for key, value in (detr_map if detector else vqa_accuracy)(adapter).items()}
    for method in method_names("relevancy", adapter.layout.rule):
        hits, right = (detr_pointing if detector else vqa_pointing)(adapter, method, scenes)
        figures[f"{name} pointing {method}"] = _mean(hits)
        if not detector:
            figures[f"{name} pointing {method}, answered right"] = _mean([h for h, r in zip(hits, right) if r])
        figures[f"{name} pointing targets"] = len(hits)
    return figures


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="shapes-lxmert,shapes-visualbert,shapes-detr")
    parser.add_argument("--scenes", type=int, default=300)
    parser.add_argument("--json")
    args = parser.parse_args()
    figures = {}
    for name in args.models.split(","):
        figures |= measure(name, args.scenes)
    if args.json and Path(args.json).exists():  # the other models keep their figures
        figures = json.loads(Path(args.json).read_text()) | figures
    report(figures, args.json)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
