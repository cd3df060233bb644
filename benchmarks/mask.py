"""Measure learned token masks (`xattn mask`, issue 16) against Chefer relevancy's top-25 % patches.

    python benchmarks/mask.py [--scenes 80] [--models shapes-vit,shapes-clip] [--json mask.json]
    python benchmarks/cards.py   # then render mask.md's tables from mask.json

With `--json` naming an existing file of the same settings, the models measured replace their entries and the
others keep theirs.

Scenes: the first N of `xattn bench quality`'s held-out stream (seed 40000, 64 px, 2–4 objects). Per scene
and target, two selections of k = round(λ·N) = 16 of the 64 patches (λ = 0.25): the learned mask (`xattn
mask` defaults: 100 steps, seed 0) and Chefer relevancy's top 16 patches (its map averaged per patch, ties
by index, the mask's own top-k rule). Patches are taken out as `xattn mask` scores `score_kept` and
`score_removed`: their keys masked in every attention layer, the CLS token kept (`capture.TokenMask`, equal to
running on the other tokens alone).

- shapes-vit: targets are the shapes present; the decision is "logit > 0" (σ > 0.5, how `xattn mask` picks
  predicted labels). shapes-clip: targets are the scene's captions; the decision is "the caption has the
  highest cosine similarity among the scene's captions" (plain captions, the texts `xattn mask` optimises
  for). With every patch, at most one caption of a scene wins, so "decided" targets are about one a scene.
- sufficiency: over the targets decided with every patch, the decision still holds with only the kept
  patches; `sufficiency_all`: the decision holds with only the kept patches, over every target (the
  shapes-clip bar: the caption ranks first among the scene's captions). complement: over the decided
  targets, the decision fails with the kept patches removed.
- over every target: pointing, `bench quality`'s pointing game on each selection's map (the mask's map is
  binary, so its pointing is the share of the kept area inside the object); recall and precision: of the
  object's patches (≥ 25 % of the patch inside the target's mask) the share kept, and of the kept patches
  the share on it.
- 95 % percentile bootstrap intervals over targets; the sufficiency gains over Chefer are bootstrapped paired.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from _report import save_json
from xattn_cli import __version__
from xattn_cli.eval import HELD_OUT_SEED
from xattn_cli.eval.metrics import bootstrap_ci, object_patches, pointing, pool_to_tokens, recall_precision
from xattn_cli.eval.quality import (CONFIDENCE, ClassifierTask, ClipTask, PatchTask, held_out_scenes, scene_targets,
                                   task_for)
from xattn_cli.methods.token_mask import MaskSettings, top_k_keep
from xattn_cli.models.registry import load_model
from xattn_cli.world.shapes import Scene

SETTINGS = MaskSettings()  # `xattn mask`'s defaults: λ = 0.25, 100 steps
SEED = 0
SELECTIONS = ("mask", "chefer")
DECIDED_METRICS = ("sufficiency", "complement")  # over the targets decided with every patch
METRICS = ("sufficiency_all", "pointing", "recall", "precision")  # over every target
RESAMPLES = 1000
PROGRESS_EVERY = 10


def classifier_scores(task: PatchTask, outputs: torch.Tensor, names: list[str]) -> torch.Tensor:
    """(S, C) logits → (S, K) the logits of the scene's targets."""
    return outputs[:, [task.index(name) for name in names]].float()


def clip_scores(task: PatchTask, outputs: torch.Tensor, names: list[str]) -> torch.Tensor:
    """(S, E) normalised image embeddings → (S, K) cosine similarity to each of the scene's plain captions."""
    texts = task.adapter.text_embeddings(names, ensemble=False, disk_cache=False)  # (K, E)
    return outputs.float() @ texts.float().T


SCORES: dict[type[PatchTask], Callable[[PatchTask, torch.Tensor, list[str]], torch.Tensor]] = {
    ClassifierTask: classifier_scores, ClipTask: clip_scores}
DECIDED: dict[type[PatchTask], Callable[[torch.Tensor, int], torch.Tensor]] = {  # (S, K) scores, target → (S,) bool
    ClassifierTask: lambda scores, k: scores[:, k] > 0,
    ClipTask: lambda scores, k: scores.argmax(dim=1) == k,
}


def scene_values(task: PatchTask, scene: Scene) -> tuple[list[dict], float]:
    """Per target: whether every patch decides it, and each selection's metrics; and the largest difference
    between the recomputed mask scores and those the explainer recorded (`score_kept`, `score_removed`)."""
    targets = scene_targets(scene, task.target_of)
    names = [name for name, _ in targets]
    learned = task.explainer("mask", names).explain([scene.image])[0]
    maps = {"mask": [target.map for target in learned], "chefer": task.maps("chefer", scene.image, names)}
    kept = {"mask": [torch.zeros(task.grid[0] * task.grid[1], dtype=torch.bool).index_fill(
                         0, torch.tensor(target.extra["kept_tokens"]), True) for target in learned],
            "chefer": [top_k_keep(pool_to_tokens(heatmap, task.grid)[None], SETTINGS.ratio)[0]
                       for heatmap in maps["chefer"]]}
    every = torch.ones_like(kept["mask"][0])
    keeps = [every] + [rows for selection in SELECTIONS for k in kept[selection] for rows in (k, ~k)]
    pixels = task.adapter.preprocess([scene.image], task.adapter.native_size)[0]  # (3, H, W)
    with torch.no_grad():
        scores = SCORES[type(task)](task, task.perturbed_outputs(pixels, torch.stack(keeps)), names)  # (1 + 4K, K)
    decided = DECIDED[type(task)]
    values, error = [], 0.0
    for k, (_, mask) in enumerate(targets):
        mask_rows = [1 + 2 * k, 2 + 2 * k]  # the mask's kept and removed rows for target k
        recorded = torch.tensor([learned[k].extra["score_kept"], learned[k].extra["score_removed"]])
        error = max(error, float((scores[mask_rows, k] - recorded).abs().max()))
        on_object = object_patches(mask, task.grid)
        value = {"decided": bool(decided(scores[:1], k)[0]), "kept_threshold": learned[k].extra["kept_threshold"]}
        for s, selection in enumerate(SELECTIONS):
            row = 1 + 2 * (s * len(names) + k)
            recall, precision = recall_precision(kept[selection][k], on_object)
            sufficient = float(decided(scores[row:row + 1], k)[0])
            value[selection] = {"sufficiency": sufficient, "sufficiency_all": sufficient,
                                "complement": float(not decided(scores[row + 1:row + 2], k)[0]),
                                "pointing": pointing(maps[selection][k], mask), "recall": recall,
                                "precision": precision}
        values.append(value)
    return values, error


def interval(sample: list[float]) -> dict[str, float]:
    low, high = bootstrap_ci(sample, RESAMPLES, CONFIDENCE)
    return {"mean": float(np.mean(sample)), "low": low, "high": high}


def progress(line: str) -> None:
    print(f"mask.py: {line}", file=sys.stderr, flush=True)


def measure(name: str, scenes: int, log: Callable[[str], None] = progress) -> dict:
    """One model's figures on the first `scenes` held-out scenes."""
    adapter = load_model(name, device="cpu")
    scene_list = held_out_scenes(scenes)
    task = task_for(adapter, scene_list, "attention")
    started = time.perf_counter()
    values, error = [], 0.0
    for index, (_, scene) in enumerate(scene_list):
        if index % PROGRESS_EVERY == 0:
            log(f"{name}: scene {index + 1}/{scenes}, {time.perf_counter() - started:.0f} s")
        scene_rows, scene_error = scene_values(task, scene)
        values += scene_rows
        error = max(error, scene_error)
    decided = [v for v in values if v["decided"]]
    figures = {selection: {**{metric: interval([v[selection][metric] for v in decided]) for metric in DECIDED_METRICS},
                           **{metric: interval([v[selection][metric] for v in values]) for metric in METRICS}}
               for selection in SELECTIONS}
    def gain(key: str, sample: list[dict]) -> dict[str, float]:
        return interval([v["mask"][key] - v["chefer"][key] for v in sample])

    return {"targets": len(values), "decided": len(decided), **figures,
            "sufficiency_gain": gain("sufficiency", decided), "sufficiency_all_gain": gain("sufficiency_all", values),
            "kept_threshold": interval([v["kept_threshold"] for v in values]),
            "recorded_score_difference": error, "elapsed_s": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=80)
    parser.add_argument("--models", default="shapes-vit,shapes-clip")
    parser.add_argument("--json")
    args = parser.parse_args()
    result = {"benchmark": "mask", "xattn": __version__, "data": f"held-out shapes world, seed {HELD_OUT_SEED}",
              "scenes": args.scenes, "keep_ratio": SETTINGS.ratio, "steps": SETTINGS.steps, "seed": SEED,
              "resamples": RESAMPLES, "confidence": CONFIDENCE, "models": {}}
    settings = ("data", "scenes", "keep_ratio", "steps", "seed", "resamples", "confidence")
    if args.json and Path(args.json).exists():  # measure some models again: the others keep their figures
        earlier = json.loads(Path(args.json).read_text())
        if any(earlier[key] != result[key] for key in settings):
            raise SystemExit(f"{args.json} holds another run's settings; write to a new file")
        result["models"] = earlier["models"]
    result["models"] |= {name: measure(name, args.scenes) for name in args.models.split(",")}
    print(json.dumps(result, indent=2))
    save_json(result, args.json)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
