"""Measure the bundled `shapes-clip`: zero-shot accuracy and CLIP Surgery pointing on held-out scenes.

    python benchmarks/shapes_clip.py [--weights FILE] [--scenes 300] [--sweep]

Zero-shot: single-object scenes, top-1 over the 36 colour×shape captions (plain and with the 85-template
ensemble). Pointing: 2–4-object scenes (half of them with two objects sharing a colour or a shape); the
texts are the captions of the objects present; a hit is a map whose peak lies inside that object's mask.
The plain patch–text similarity (no surgery) is the baseline. `--sweep` scores surgery blocks and input
sizes on a separate validation stream (seed 30000) to choose the config defaults; the reported figures
use the held-out stream (seed 20000), which neither training nor the sweep sees.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
import torch.nn.functional as F

from _report import report
from xattn_cli.eval.metrics import pointing as pointing_hit
from xattn_cli.explainers.surgery import SurgeryExplainer
from xattn_cli.methods.surgery import interpolate_grid_embedding, similarity_map
from xattn_cli.models.bundled import load_bundled_clip
from xattn_cli.world.shapes import COLORS, SHAPES, scene_at

CAPTIONS = [f"a {color} {shape}" for shape in SHAPES for color in COLORS]
HELD_OUT, VALIDATION = 20_000, 30_000


def zero_shot(adapter, n: int, ensemble: bool) -> float:
    scenes = [scene_at(HELD_OUT, i, size=64, n_objects=1) for i in range(n)]
    pixels = adapter.preprocess([s.image for s in scenes], adapter.native_size)
    with torch.inference_mode():
        image = F.normalize(adapter.model.encode_image(pixels), dim=-1)
    text = adapter.text_embeddings(CAPTIONS, ensemble=ensemble)
    predicted = (image @ text.T).argmax(dim=1).tolist()
    truth = [CAPTIONS.index(s.objects[0].caption) for s in scenes]
    return float(np.mean([p == t for p, t in zip(predicted, truth)]))


def pointing(adapter, seed: int, n: int, blocks: int | None, size: int | None, surgery: bool = True) -> float:
    hits = []
    for i in range(n):
        scene = scene_at(seed, i, size=64, n_objects=2 + i % 3)
        texts = [o.caption for o in scene.objects]
        explainer = SurgeryExplainer(adapter, texts, size=(size, size) if size else None, blocks=blocks)
        if surgery:
            maps = [t.map for t in explainer.explain([scene.image])[0]]
        else:
            maps = plain_similarity_maps(adapter, explainer, scene.image)
        hits += [pointing_hit(heat, obj.mask) for obj, heat in zip(scene.objects, maps)]
    return float(np.mean(hits))


def plain_similarity_maps(adapter, explainer, image) -> list[np.ndarray]:
    """Baseline: the unmodified model's patch tokens against the texts (reference §1, raw CLIP maps)."""
    visual = adapter.model.visual
    pixels = adapter.preprocess([image], explainer.size)
    grid = adapter.grid(explainer.size)
    with torch.inference_mode():
        patches = visual.conv1(pixels).flatten(2).transpose(1, 2)  # (1, N, D)
        tokens = torch.cat([visual.class_embedding.expand(1, 1, -1), patches], dim=1)  # (1, n, D)
        tokens = visual.ln_pre(tokens + interpolate_grid_embedding(visual.positional_embedding, grid))
        for block in visual.transformer.resblocks:
            tokens = block(tokens)
        tokens = visual.ln_post(tokens) @ visual.proj  # (1, n, E)
        similarity = F.normalize(tokens, dim=-1) @ explainer.text_features.T  # (1, n, K)
    return list(similarity_map(similarity, grid, (image.height, image.width))[0].numpy())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", help="weights file (default: the bundled one)")
    parser.add_argument("--scenes", type=int, default=300)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as every benchmark here: one thread beside another job, not two contending for 2 cores
    adapter = load_bundled_clip("shapes-clip", args.weights)
    figures = {}
    if args.sweep:
        for size in (64, 96, 128):
            for blocks in range(1, 7):
                score = pointing(adapter, VALIDATION, args.scenes // 3, blocks, size)
                print(f"validation pointing size={size} blocks={blocks}: {score:.3f}", file=sys.stderr)
                figures[f"validation_pointing_size{size}_blocks{blocks}"] = score
    figures["zero_shot_plain"] = zero_shot(adapter, 2 * args.scenes, ensemble=False)
    figures["zero_shot_ensemble"] = zero_shot(adapter, 2 * args.scenes, ensemble=True)
    figures["pointing_surgery"] = pointing(adapter, HELD_OUT, args.scenes, None, None)
    figures["pointing_plain_similarity"] = pointing(adapter, HELD_OUT, args.scenes, None, None, surgery=False)
    report(figures, args.json)


if __name__ == "__main__":
    main()
