"""Measure what causal attention (CATT, issue 17) does to a colour–shape confound: `shapes-catt` against
`shapes-catt-base` (the same model without cross-sample attention, same initial weights and batches), per
seed, on a neutral, a correlated and an anti-correlated split.

    python -m xattn_cli.train.shapes_catt --out runs/catt-s0 --seed 0   # and seeds 1, 2 (25 min a seed)
    python benchmarks/catt.py ../runs/catt-s0 ../runs/catt-s1 ../runs/catt-s2 --json catt.json
    python benchmarks/cards.py   # then render catt.md's tables from catt.json

Both models train on the `biased:0.9` colour rule (a shape wears its usual colour 90 % of the time). Splits:
500 scenes each (64 px), every question of a scene: neutral (stream 12000, colours free, the training
runs' held-out stream), correlated (stream 12001, `biased:1`: always the usual colour), anti (stream
12002, `anti`: never the usual colour).

- accuracy, overall and per kind of answer (colour, shape, yes/no); the **shortcut rate** on anti: of the
  colour and shape questions, the share answered with the confounded partner (the shape's usual colour,
  the colour's usual shape), which is never right there.
- validity: the base model must lose ≥ 15 points from correlated to anti, or the experiment shows no bias.
- Δ = CATT − base, per seed and split (paired: the same questions), mean ± sd over seeds, and a 95 %
  percentile bootstrap interval over questions of the seeds' mean Δ. "No effect" unless |mean Δ| > 2 sd
  and the interval excludes 0.
- CS usage (is the cross-sample branch used at all?): CATT's accuracy, and the share of its answers that
  change, with its CS-ATT output replaced by the split's mean for each region position (mean ablation) and
  by zeros; how large the CS half of the fusion (`combine`) is beside the IS half, overall and in what varies
  between scenes; the mean `dictionary_share` of Chefer relevance (the share `xattn relevancy` reports)
  over the first `--share-scenes` scenes' questions.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from xattn_cli import __version__
from xattn_cli.eval.metrics import bootstrap_ci
from xattn_cli.explainers import build_relevancy
from xattn_cli.methods.causal import CausalRelevance
from xattn_cli.models.registry import load_model
from xattn_cli.train.shapes_catt import BASE, CATT
from xattn_cli.train import shapes_vqa
from xattn_cli.train.shapes_vqa import ANSWERS, answer_kind
from xattn_cli.world.shapes import USUAL_COLOUR, USUAL_SHAPE, ColourRule, scene_at

SPLITS = {"neutral": (12_000, "free"), "correlated": (12_001, "biased:1"), "anti": (12_002, "anti")}
KINDS = ("colour", "shape", "yes_no")
CHUNK = 256
MIN_BIAS_GAP = 0.15
RESAMPLES = 1000


class Split:
    """Every question of the first `count` scenes of one split: stem pixels, (scene, question, answer)
    items and, per item, the answer the confound suggests (None for yes/no questions)."""

    def __init__(self, name: str, count: int, size: int):
        seed, rule = SPLITS[name]
        self.name, self.rule = name, rule
        self.scenes = [scene_at(seed, index, size=size, colour_rule=ColourRule.parse(rule)) for index in range(count)]
        self.items = [(i, qa["question"], qa["answer"]) for i, scene in enumerate(self.scenes) for qa in scene.qa]
        self.shortcuts = [shortcut(question) for _, question, _ in self.items]


def shortcut(question: str) -> str | None:
    """The confounded partner a question invites: "what colour is the star?" → the star's usual colour,
    "what shape is red?" → red's usual shape; None for yes/no questions."""
    words = question.rstrip("?").split()
    if question.startswith("what colour is the"):
        return USUAL_COLOUR[words[-1]]
    if question.startswith("what shape is"):
        return USUAL_SHAPE[words[-1]]
    return None


@contextmanager
def replaced_cross_sample(adapter, replacement: torch.Tensor | None):
    """CS-ATT's output replaced by `replacement` (R, dim), broadcast over the batch; None leaves it alone."""
    if replacement is None:
        yield
        return
    def hook(module, inputs, output):
        values, probabilities = output
        return replacement.to(values).expand_as(values), probabilities
    handle = adapter.model.causal.cross_sample.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def stem_features(adapter, split: Split) -> torch.Tensor:
    """The stem features of the split's scenes: (N, R, D)."""
    return shapes_vqa.stem_features(adapter, adapter.regions.pixels([scene.image for scene in split.scenes]), CHUNK)


def predictions(adapter, split: Split, features: torch.Tensor, replacement: torch.Tensor | None = None) -> list[str]:
    """The model's answer to every item of `split` (with CS-ATT's output replaced by `replacement`, if given)."""
    with replaced_cross_sample(adapter, replacement):
        return [ANSWERS[index] for index in shapes_vqa.predicted_answers(adapter, features, split.items, CHUNK)]


@torch.no_grad()
def branch_outputs(adapter, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """IS-ATT's and CS-ATT's outputs for every scene of the split: (N, R, dim) each."""
    causal, in_sample, cross_sample = adapter.model.causal, [], []
    for chunk in features.split(CHUNK):
        regions = adapter.regions.regions(chunk)
        tokens = adapter.model.causal_input(regions.features, regions.boxes, regions.mask)  # (b, R, dim)
        entries = causal.dictionary.unsqueeze(0).expand(len(tokens), -1, -1)  # (b, K, dim)
        in_sample.append(causal.in_sample(tokens, tokens, regions.mask, regions.mask)[0])  # (b, R, dim)
        cross_sample.append(causal.cross_sample(tokens, entries, None, regions.mask)[0])  # (b, R, dim)
    return torch.cat(in_sample), torch.cat(cross_sample)


def fusion_contributions(adapter, in_sample: torch.Tensor, cross_sample: torch.Tensor) -> dict[str, float]:
    """How much of the fused output each branch writes: `combine`'s weight halves applied to each branch
    (N, R, dim), as the ratio of CS's mean norm to IS's, in total and in what varies from scene to scene
    (each deviation from its split mean at that region position)."""
    dim = in_sample.shape[-1]
    weight = adapter.model.causal.combine.weight.detach()  # (dim, 2·dim): [IS half | CS half]
    from_in, from_cross = in_sample @ weight[:, :dim].T, cross_sample @ weight[:, dim:].T  # (N, R, dim) each

    def mean_norm(values: torch.Tensor) -> float:
        return float(values.norm(dim=-1).mean())

    return {"cs_to_is_norm": mean_norm(from_cross) / mean_norm(from_in),
            "cs_to_is_norm_varying": mean_norm(from_cross - from_cross.mean(dim=0))
            / mean_norm(from_in - from_in.mean(dim=0))}


def dictionary_share(adapter, split: Split, features: torch.Tensor, scenes: int) -> float:
    """Mean share of [CLS]'s Chefer relevance that reaches dictionary entries, over the questions of the
    first `scenes` scenes, each explained for the model's own answer (as `xattn relevancy` does)."""
    explainer = build_relevancy(adapter, method="chefer", questions=["?"])  # relevance_rows takes its own
    items = [item for item in split.items if item[0] < scenes]
    shares = []
    for start in range(0, len(items), 64):
        chunk = items[start:start + 64]
        batch = adapter.tokenize([question for _, question, _ in chunk])
        regions = adapter.regions.regions(features[torch.tensor([scene for scene, _, _ in chunk])])
        _, _, tokens, region_rows, entry_rows = explainer.relevance_rows(batch, regions)
        shares += CausalRelevance(tokens, region_rows, entry_rows).dictionary_share.tolist()
    return float(np.mean(shares))


def scores(split: Split, guesses: list[str]) -> tuple[dict[str, float], np.ndarray]:
    """Accuracy overall and per kind (on the anti split also the shortcut rate); the per-item hits (n,)."""
    hits = np.array([guess == answer for guess, (_, _, answer) in zip(guesses, split.items)], dtype=np.float64)
    kinds = np.array([answer_kind(answer) for _, _, answer in split.items])
    figures = {"accuracy": float(hits.mean())}
    figures |= {f"accuracy_{kind}": float(hits[kinds == kind].mean()) for kind in KINDS if (kinds == kind).any()}
    asked = [(guess, partner) for guess, partner in zip(guesses, split.shortcuts) if partner is not None]
    if split.name == "anti":
        figures["shortcut_rate"] = float(np.mean([guess == partner for guess, partner in asked]))
    return figures, hits


def cs_usage(adapter, split: Split, features: torch.Tensor, guesses: list[str], share_scenes: int) -> dict:
    """Whether CATT uses its CS branch on `split`: accuracy and the share of answers that change with CS-ATT's
    output mean-ablated (its split mean at each region position) or zeroed; the branches' contributions to
    the fusion; the dictionary's share of relevance."""
    in_sample, cross_sample = branch_outputs(adapter, features)
    mean = cross_sample.mean(dim=0)  # (R, dim)
    usage = fusion_contributions(adapter, in_sample, cross_sample)
    for label, replacement in (("mean_ablated", mean), ("zeroed", torch.zeros_like(mean))):
        ablated = predictions(adapter, split, features, replacement)
        usage[f"accuracy_cs_{label}"] = scores(split, ablated)[0]["accuracy"]
        usage[f"changed_cs_{label}"] = float(np.mean([a != b for a, b in zip(ablated, guesses)]))
    usage["dictionary_share"] = dictionary_share(adapter, split, features, share_scenes)
    return usage


def measure_run(folder: Path, splits: list[Split], share_scenes: int) -> tuple[dict, dict]:
    """Figures of one seed's two models on every split, and their per-item hits {model: {split: (n,)}}."""
    figures, hits = {}, {}
    for name in (BASE, CATT):
        adapter = load_model(f"hf:{folder / name}", device="cpu")
        adapter.model.eval()
        figures[name], hits[name] = {}, {}
        for split in splits:
            features = stem_features(adapter, split)
            guesses = predictions(adapter, split, features)
            figures[name][split.name], hits[name][split.name] = scores(split, guesses)
            if name == CATT:
                figures[name][split.name] |= cs_usage(adapter, split, features, guesses, share_scenes)
        print(f"{folder} {name}: " + ", ".join(f"{s}: {f['accuracy']:.3f}" for s, f in figures[name].items()),
              file=sys.stderr)
    return figures, hits


def mean_sd(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}


def summarise(runs: dict[str, dict], hits: dict[str, dict], splits: list[Split]) -> dict:
    """Mean ± sd over seeds of every figure, the bias gate and the paired differences."""
    seeds = list(runs)
    summary = {}
    for name in (BASE, CATT):
        summary[name] = {split.name: {key: mean_sd([runs[seed][name][split.name][key] for seed in seeds])
                                      for key in runs[seeds[0]][name][split.name]} for split in splits}
    gaps = [runs[seed][BASE]["correlated"]["accuracy"] - runs[seed][BASE]["anti"]["accuracy"] for seed in seeds]
    summary["bias_gap"] = {**mean_sd(gaps), "values": gaps, "minimum": MIN_BIAS_GAP,
                           "shows_bias": bool(np.mean(gaps) >= MIN_BIAS_GAP)}
    summary["delta"] = {}
    for split in splits:
        per_seed = np.stack([hits[seed][CATT][split.name] - hits[seed][BASE][split.name] for seed in seeds])  # (S, n)
        values = per_seed.mean(axis=1).tolist()
        low, high = bootstrap_ci(per_seed.mean(axis=0), resamples=RESAMPLES)
        spread = mean_sd(values)
        effect = abs(spread["mean"]) > 2 * spread["sd"] and not low <= 0 <= high
        summary["delta"][split.name] = {**spread, "values": values, "low": low, "high": high, "effect": bool(effect)}
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="folders of `train.shapes_catt --out` (one per seed)")
    parser.add_argument("--scenes", type=int, default=500, help="scenes per split")
    parser.add_argument("--size", type=int, default=64, help="scene size in pixels (configs/shapes-catt.json)")
    parser.add_argument("--share-scenes", type=int, default=100, help="scenes whose questions the share reads")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    started = time.perf_counter()
    splits = [Split(name, args.scenes, args.size) for name in SPLITS]
    runs, hits, recipes = {}, {}, {}
    for folder in args.runs:
        recipe = json.loads((folder / CATT / "xattn.json").read_text())["recipe"]
        seed = str(recipe["seed"])
        recipes[seed] = {name: json.loads((folder / name / "xattn.json").read_text())["recipe"]
                         for name in (BASE, CATT)}
        runs[seed], hits[seed] = measure_run(folder, splits, args.share_scenes)
    result = {"version": __version__, "scenes": args.scenes, "size": args.size, "share_scenes": args.share_scenes,
              "splits": {name: {"stream": stream, "colour_rule": rule, "questions": len(split.items)}
                         for split, (name, (stream, rule)) in zip(splits, SPLITS.items())},
              "recipes": recipes, "seeds": runs, "summary": summarise(runs, hits, splits),
              "elapsed_s": round(time.perf_counter() - started, 1)}
    text = json.dumps(result, indent=2) + "\n"
    if args.json:
        args.json.write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
