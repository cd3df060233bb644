"""The bundled models on the style-shifted split: scenes of the same vocabulary drawn by a renderer no model
trains on (`scene_at(..., style="shifted")`), every figure with a 95 % bootstrap interval; and whether the
models answer right on the README's demo scenes (another renderer again, 224 px).

    python benchmarks/shifted.py [--models shapes-lxmert,...] [--scenes 300] [--json shifted.json]

With `--json` naming an existing file of the same settings, the models measured replace their entries and the
others keep theirs.

Streams: seed 25 000 for every figure (no training run or recipe draws from it), drawn per model as its
benchmark draws them on its own stream:
- shapes-lxmert, shapes-visualbert: 1–4 objects; answer accuracy over every question; pointing (the map's peak
  inside the asked object) for every question about one object, explained for the answer the model gives
  (`bench quality`'s VQA task), by Chefer relevancy, raw attention and attention Grad-CAM.
- shapes-clip: zero-shot top-1 over the 36 captions on single-object scenes; CLIP Surgery pointing for each
  object of 2–4-object scenes (half forced to share a colour or a shape), the scene's captions as texts, and
  over the scenes where every object shares its colour or its shape with another.
Demo scenes: VQA answers to every colour question and to shape questions about a colour one object has;
surgery maps whose peak lies in the object (masks: the saturated pixels of its colour connected to a pixel
read by eye);
ViT's shape set; DETR's detected labels.
- shapes-vit: per-shape accuracy (six binary decisions) on scenes of 1–3 distinct shapes; pointing for each
  shape present in 2–3-object scenes of distinct shapes, by Chefer, rollout, raw and attention Grad-CAM.
- shapes-detr: mAP@0.5 on 1–4-object scenes (intervals by resampling scenes); pointing of each detection
  above the CLI's threshold inside its own predicted box, by Chefer, raw and attention Grad-CAM; the share of
  scenes whose detections above that threshold are exactly the drawn shapes, and of scenes with a class
  detected more often than drawn (duplicates, which mAP@0.5 barely charges).
Intervals resample the items a figure averages (questions, targets, decisions), seeded.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from _report import save_json
from xattn_cli.eval.detection import average_precision, match
from xattn_cli.eval.metrics import bootstrap_ci, pointing
from xattn_cli.eval.quality import ClassifierTask, ClipTask, VqaTask, held_out_scenes
from xattn_cli.explainers.detection import DEFAULT_THRESHOLD, DetectionRelevancy
from xattn_cli.explainers.vqa import VqaRelevancy
from xattn_cli.models.detr import boxes_to_pixels
from xattn_cli.models.registry import load_model
from xattn_cli.world.shapes import COLOR_RGB, COLORS, SHAPES, scene_at

SEED, STYLE, SIZE = 25_000, "shifted", 64
DEMO_FOLDER = Path(__file__).resolve().parent.parent / "assets" / "images"  # in the repository, not the package
RESAMPLES = 1000
CAPTIONS = [f"a {color} {shape}" for shape in SHAPES for color in COLORS]
MODELS = ("shapes-lxmert", "shapes-visualbert", "shapes-clip", "shapes-vit", "shapes-detr")
DEMO = {  # the README's demo scenes (assets/images), read by eye: shape, colour and a pixel (x, y) of each object
    "scene-01": [("square", "orange", (82, 65)), ("circle", "orange", (102, 148)), ("star", "blue", (170, 120))],
    "scene-02": [("triangle", "red", (65, 145)), ("cross", "purple", (143, 148))],
    "scene-03": [("star", "orange", (85, 33)), ("triangle", "purple", (180, 62)), ("circle", "purple", (79, 143)),
                 ("ring", "purple", (141, 140))],
    "scene-04": [("square", "orange", (150, 115))],
}
SATURATED = 60  # max − min of a pixel's RGB: the demo scenes' objects are above it, their grey backgrounds below


def interval(values) -> dict:
    """Mean, 95 % bootstrap interval and count of per-item values."""
    values = [float(v) for v in values]
    low, high = bootstrap_ci(values, RESAMPLES)
    return {"mean": float(np.mean(values)), "low": low, "high": high, "n": len(values)}


def scene(index: int, **kwargs):
    return scene_at(SEED, index, size=SIZE, style=STYLE, **kwargs)


def demo_image(name: str) -> Image.Image:
    return Image.open(DEMO_FOLDER / f"{name}.png").convert("RGB")


def demo_masks(name: str) -> list[np.ndarray]:
    """Each demo object's (H, W) mask: the saturated pixels nearest its colour's RGB, connected to its pixel."""
    rgb = np.asarray(demo_image(name)).astype(float)  # (H, W, 3)
    saturated = rgb.max(axis=2) - rgb.min(axis=2) > SATURATED  # (H, W)
    palette = np.array([COLOR_RGB[colour] for colour in COLORS], dtype=float)  # (6, 3)
    nearest = np.linalg.norm(rgb[:, :, None] - palette, axis=-1).argmin(axis=-1)  # (H, W) colour index
    masks = []
    for _, colour, point in DEMO[name]:
        mine = ((saturated & (nearest == COLORS.index(colour))) * 255).astype(np.uint8)  # (H, W)
        candidates = Image.fromarray(mine).copy()  # a copy: floodfill leaves array-backed images unchanged
        ImageDraw.floodfill(candidates, point, 128)
        masks.append(np.asarray(candidates) == 128)
    return masks


# --- VQA ---------------------------------------------------------------------------------------------------
def answers(adapter, image: Image.Image, questions: list[str]) -> list[str]:
    with torch.inference_mode():
        regions = adapter.regions([image]).to(adapter.device)
        batch = adapter.tokenize(questions)
        logits = adapter.answer_logits(batch, regions.repeat(len(questions)))
        return [adapter.answers[k] for k in logits.argmax(dim=-1).tolist()]


def demo_questions(objects: list[tuple]) -> list[tuple[str, str]]:
    """(question, answer): the colour of every shape, and the shape of every colour only one object has."""
    colours = [colour for _, colour, *_ in objects]
    return ([(f"what colour is the {shape}?", colour) for shape, colour, *_ in objects]
            + [(f"what shape is {colour}?", shape) for shape, colour, *_ in objects if colours.count(colour) == 1])


def measure_vqa(adapter, scenes: int) -> dict:
    right, kinds = [], {"colour": [], "shape": [], "yes_no": []}
    hits = {method: [] for method in ("chefer", "raw", "attn-gradcam")}
    task = VqaTask(adapter)
    for index in range(scenes):
        drawn = scene(index)
        questions = [qa["question"] for qa in drawn.qa]
        for qa, given in zip(drawn.qa, answers(adapter, drawn.image, questions)):
            right.append(given == qa["answer"])
            kind = "colour" if qa["question"].startswith("what colour") else (
                "shape" if qa["question"].startswith("what shape") else "yes_no")
            kinds[kind].append(given == qa["answer"])
        targets = task.targets(drawn)
        for method, method_hits in hits.items():
            maps = task.maps(method, drawn.image, [name for name, _ in targets])
            method_hits += [pointing(heat, mask) for heat, (_, mask) in zip(maps, targets)]
    demo = [given == answer for name, objects in DEMO.items()
            for (_, answer), given in zip(demo_questions(objects), answers(
                adapter, demo_image(name), [q for q, _ in demo_questions(objects)]))]
    return {"accuracy": interval(right), **{f"accuracy_{k}": interval(v) for k, v in kinds.items()},
            **{f"pointing_{m}": interval(v) for m, v in hits.items()}, "demo_right": sum(demo), "demo_total": len(demo)}


# --- CLIP ----------------------------------------------------------------------------------------------------
def shares_colour_or_shape_everywhere(drawn) -> bool:
    """Every object shares its colour or its shape with another object of the scene."""
    return all(any(o is not other and (o.color == other.color or o.shape == other.shape) for other in drawn.objects)
               for o in drawn.objects)


def measure_clip(adapter, scenes: int) -> dict:
    singles = [scene(index, n_objects=1) for index in range(scenes)]
    pixels = adapter.preprocess([s.image for s in singles], adapter.native_size)
    with torch.inference_mode():
        image = F.normalize(adapter.encode_image(pixels), dim=-1)  # (S, E)
    predicted = (image @ adapter.text_embeddings(CAPTIONS).T).argmax(dim=1).tolist()
    zero_shot = [CAPTIONS[p] == s.objects[0].caption for p, s in zip(predicted, singles)]
    many = held_out_scenes(scenes, SEED, STYLE)
    task = ClipTask(adapter, {o.caption for _, s in many for o in s.objects})
    hits, shared = [], []
    for _, drawn in many:
        targets = task.targets(drawn)
        maps = task.maps("surgery", drawn.image, [name for name, _ in targets])
        scene_hits = [pointing(heat, mask) for heat, (_, mask) in zip(maps, targets)]
        hits += scene_hits
        if shares_colour_or_shape_everywhere(drawn):
            shared += scene_hits
    demo = []
    for name, objects in DEMO.items():
        texts = [f"a {colour} {shape}" for shape, colour, _ in objects]
        maps = task.maps("surgery", demo_image(name), texts)
        demo += [pointing(heat, mask) == 1.0 for heat, mask in zip(maps, demo_masks(name))]
    return {"zero_shot": interval(zero_shot), "pointing_surgery": interval(hits),
            "pointing_surgery_shared": interval(shared), "demo_right": sum(demo), "demo_total": len(demo)}


# --- ViT -----------------------------------------------------------------------------------------------------
def measure_vit(adapter, scenes: int) -> dict:
    decisions = []
    for start in range(0, scenes, 100):
        drawn = [scene(index, n_objects=1 + index % 3, distinct_shapes=True)
                 for index in range(start, min(start + 100, scenes))]
        with torch.inference_mode():
            present = adapter.classify(adapter.preprocess([s.image for s in drawn], adapter.native_size)) > 0  # (S, C)
        for row, s in zip(present, drawn):
            truth = {o.shape for o in s.objects}
            decisions += [bool(row[adapter.target_index(shape)]) == (shape in truth) for shape in SHAPES]
    task = ClassifierTask(adapter, SHAPES)
    hits = {m: [] for m in ("chefer", "rollout", "raw", "attn-gradcam")}
    for index in range(scenes):
        drawn = scene(index, n_objects=2 + index % 2, distinct_shapes=True)
        targets = task.targets(drawn)
        for method, method_hits in hits.items():
            maps = task.maps(method, drawn.image, [name for name, _ in targets])
            method_hits += [pointing(heat, mask) for heat, (_, mask) in zip(maps, targets)]
    with torch.inference_mode():
        logits = adapter.classify(adapter.preprocess([demo_image(name) for name in DEMO], adapter.native_size))
    demo = [{shape for shape in SHAPES if row[adapter.target_index(shape)] > 0} == {shape for shape, *_ in objects}
            for row, objects in zip(logits, DEMO.values())]
    return {"per_shape_accuracy": interval(decisions), **{f"pointing_{m}": interval(v) for m, v in hits.items()},
            "demo_right": sum(demo), "demo_total": len(demo)}


# --- DETR ----------------------------------------------------------------------------------------------------
def scene_detections(adapter, drawn) -> tuple[list[tuple[int, float, bool]], dict[int, int]]:
    """Every query of one scene as (class, score, true positive) and the scene's objects per class."""
    with torch.inference_mode():
        logits, boxes = adapter.detect(adapter.preprocess([drawn.image], adapter.native_size))
    scores, labels = logits[0].float().softmax(dim=-1)[:, :-1].max(dim=-1)  # (Q,)
    corners = boxes_to_pixels(boxes[0].float(), (SIZE, SIZE)).tolist()  # (Q, 4)
    found, truths = [], {}
    for label in range(len(adapter.labels)):
        truth = [o.box for o in drawn.objects if o.shape == adapter.labels[label]]
        mine = [q for q in range(len(labels)) if labels[q] == label]
        hits = match([corners[q] for q in mine], [float(scores[q]) for q in mine], truth, 0.5)
        found += [(label, float(scores[q]), hit) for q, hit in zip(mine, hits)]
        if truth:
            truths[label] = len(truth)
    return found, truths


def count_detections(detections: list[tuple[int, float, bool]]) -> dict[int, int]:
    """Detections per class above the explainer's default threshold: a right scene has its objects' counts."""
    kept = [label for label, score, _ in detections if score > DEFAULT_THRESHOLD]
    return {label: kept.count(label) for label in set(kept)}


def mean_ap(per_scene: list[tuple[list, dict]]) -> float:
    """mAP@0.5 over the classes with ground truth in these scenes (hits were matched per scene)."""
    aps = []
    for label in sorted({label for _, truths in per_scene for label in truths}):
        found = [(score, hit) for detections, _ in per_scene for c, score, hit in detections if c == label]
        total = sum(truths.get(label, 0) for _, truths in per_scene)
        aps.append(average_precision([s for s, _ in found], [h for _, h in found], total))
    return float(np.mean(aps))


def measure_detr(adapter, scenes: int) -> dict:
    drawn = [scene(index) for index in range(scenes)]
    per_scene = [scene_detections(adapter, s) for s in drawn]
    draws = np.random.default_rng(0).integers(0, scenes, size=(RESAMPLES, scenes))  # (R, n)
    resampled = np.quantile([mean_ap([per_scene[i] for i in row]) for row in draws], [0.025, 0.975])
    figures = {"map50": {"mean": mean_ap(per_scene), "low": float(resampled[0]), "high": float(resampled[1]),
                         "n": scenes}}
    counted = [count_detections(detections) for detections, _ in per_scene]  # per scene: {class: detections}
    figures["scenes_exact"] = interval([kept == truths for kept, (_, truths) in zip(counted, per_scene)])
    figures["scenes_over_counted"] = interval([any(n > truths.get(c, 0) for c, n in kept.items())
                                               for kept, (_, truths) in zip(counted, per_scene)])
    rows, cols = np.mgrid[:SIZE, :SIZE]  # (H, W) pixel indices
    for method in ("chefer", "raw", "attn-gradcam"):
        hits, explainer = [], DetectionRelevancy(adapter, method=method)
        for s in drawn:
            for target in explainer.explain([s.image])[0]:
                x0, y0, x1, y1 = target.extra["box"]
                inside = (cols + 0.5 >= x0) & (cols + 0.5 <= x1) & (rows + 0.5 >= y0) & (rows + 0.5 <= y1)
                hits.append(pointing(target.map, inside))
        figures[f"box_pointing_{method}"] = interval(hits)
    demo = [sorted(t.extra["label"] for t in DetectionRelevancy(adapter, method="raw").explain([demo_image(n)])[0])
            == sorted(shape for shape, *_ in objects) for n, objects in DEMO.items()]
    return {**figures, "demo_right": sum(demo), "demo_total": len(demo)}


MEASURES = {"vqa": measure_vqa, "image-text": measure_clip, "classify": measure_vit, "detect": measure_detr}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--scenes", type=int, default=300)
    parser.add_argument("--json")
    args = parser.parse_args()
    result = {"style": STYLE, "seed": SEED, "scenes": args.scenes, "resamples": RESAMPLES, "models": {}}
    if args.json and Path(args.json).exists():  # measure some models again: the others keep their figures
        earlier = json.loads(Path(args.json).read_text())
        if {key: earlier[key] for key in ("style", "seed", "scenes", "resamples")} != {
                key: result[key] for key in ("style", "seed", "scenes", "resamples")}:
            raise SystemExit(f"{args.json} holds another run's settings; write to a new file")
        result["models"] = earlier["models"]
    for name in args.models.split(","):
        started = time.perf_counter()
        adapter = load_model(name, device="cpu")
        figures = MEASURES[adapter.layout.task](adapter, args.scenes)
        result["models"][name] = {**figures, "elapsed_s": round(time.perf_counter() - started, 1)}
        for key, value in figures.items():
            text = (f"{value['mean']:.3f} [{value['low']:.3f}, {value['high']:.3f}]" if isinstance(value, dict)
                    else value)
            print(f"| {name} | {key} | {text} |", flush=True)
    save_json(result, args.json)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
