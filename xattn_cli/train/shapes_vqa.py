"""Train `shapes-lxmert` or `shapes-visualbert`: a tiny Hugging Face VQA model over conv-stem grid regions,
answering the shapes world's questions (seeded, resumable).

    python -m xattn_cli.train.shapes_vqa --family lxmert --out DIR --steps 6000 [--device cuda]

Each training scene (stream seed 3, 1–4 objects, 64 px) contributes one of its questions ("what colour is the
star?", "what shape is red?", "is there a green cross?"); the answers are the six colours, the six shapes, yes
and no (cross-entropy over the 14), plus an auxiliary per-cell shape and colour loss on the stem (its head is
dropped after training). Visual tokens: a small CNN (`GridStem`, trained with the model) gives one
feature per cell of an 8×8 grid, with the cell's normalised box (`StemGridRegions`). Questions use a word-level
vocabulary (`vocab.txt`, BERT special tokens + the world's words). Held out: every question of the first
`--eval-scenes` scenes of stream seed 12000; the metric is answer accuracy. Training scenes are drawn in world
style `--style` (classic or varied), held-out ones in `--eval-style` (shifted: the style-shifted validation split).

DIR ends up a `hf:DIR` folder: `config.json` + `model.safetensors` (fp16 where accuracy holds), the tokenizer
(`vocab.txt`), `region_stem.safetensors`, `xattn.json` (regions and the recipe's figures), `log.jsonl` and
`checkpoint.pt` (a rerun with the same arguments resumes from it).
"""
from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from xattn_cli.config import CONFIG_DIR
from xattn_cli.device import flush_denormals
from xattn_cli.models.regions import GridRegions, GridStem, StemGridRegions, build_region_vqa
from xattn_cli.text import WordTokenizer
from xattn_cli.train import Checkpoint, cell_labels, cell_loss, fit, run_arguments, run_options, storage_dtype
from xattn_cli.world.shapes import COLORS, FREE, SHAPES, ColourRule, scene_at

ANSWERS = [*COLORS, *SHAPES, "yes", "no"]
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TRAIN_SEED, EVAL_SEED = 3, 12_000
STEM_FILE = "region_stem.safetensors"


def question_words(scenes: int = 50) -> list[str]:
    """The words of the world's questions (those of `scenes` scenes, plus every shape and colour), sorted."""
    split = WordTokenizer([]).words
    words = set(SHAPES) | set(COLORS)
    for index in range(scenes):
        for qa in scene_at(TRAIN_SEED, index, size=32).qa:
            words.update(split(qa["question"]))
    return sorted(words)


def write_tokenizer(folder: Path):
    """A BERT tokenizer over a word-level `vocab.txt` written into `folder` (no word is split into pieces)."""
    import transformers

    (folder / "vocab.txt").write_text("\n".join(SPECIAL_TOKENS + question_words()) + "\n", encoding="utf-8")
    return transformers.BertTokenizer(str(folder / "vocab.txt"))


def build_adapter(cfg: dict, family: str, tokenizer):
    """The family's adapter around a fresh model, its visual tokens from a fresh `GridStem`."""
    return build_region_vqa(family, cfg, tokenizer, ANSWERS)


def training_batch(step: int, batch_size: int, source: GridRegions, size: int, colour_rule: ColourRule = FREE,
                   style: str = "classic"):
    """Pixels (B, H, W, 3) of scenes step·B … step·B + B − 1 (drawn under `colour_rule`, in world style `style`),
    one question of each, answer indices (B,), and the cells' shape and colour labels (B, R, 2)."""
    rng = np.random.default_rng([TRAIN_SEED, step, 7])
    images, questions, answers, cells = [], [], [], []
    for index in range(step * batch_size, (step + 1) * batch_size):
        scene = scene_at(TRAIN_SEED, index, size=size, colour_rule=colour_rule, style=style)
        qa = scene.qa[int(rng.integers(len(scene.qa)))]
        images.append(scene.image)
        questions.append(qa["question"])
        answers.append(ANSWERS.index(qa["answer"]))
        cells.append(cell_labels(scene, source.grid))
    return source.pixels(images), questions, torch.tensor(answers), torch.stack(cells)


def answer_logits(adapter, features: torch.Tensor, questions: list[str]) -> torch.Tensor:
    """(B, answers) for stem features (B, R, D), through the adapter the explainers use."""
    regions = adapter.regions.regions(features).to(features.device)
    return adapter.answer_logits(adapter.tokenize(questions), regions)


def cell_head(stem: GridStem) -> torch.nn.Linear:
    """The auxiliary head (training only) that reads each cell's shape and colour, 7 classes each, off the stem."""
    return torch.nn.Linear(stem.dim, 2 * (len(SHAPES) + 1))


def batch_loss(adapter, head: torch.nn.Linear, cell_weight: float, batch) -> tuple[torch.Tensor, dict]:
    """Answer cross-entropy plus `cell_weight` × the cells' shape and colour cross-entropy: a dense signal that
    teaches the stem shapes early (DESIGN §7: shape is learnt far more slowly than colour)."""
    pixels, questions, answers, cells = batch
    device = adapter.device
    features = adapter.regions.stem(pixels.to(device))  # (B, R, D)
    answer = F.cross_entropy(answer_logits(adapter, features, questions), answers.to(device))
    cell = cell_loss(head(features), cells.to(device))
    return answer + cell_weight * cell, {"answer": round(answer.item(), 4), "cells": round(cell.item(), 4)}


class HeldOut:
    """Every question of the first `count` scenes of the held-out stream, drawn in world style `style`."""

    def __init__(self, source: StemGridRegions, count: int, size: int, style: str = "classic"):
        scenes = [scene_at(EVAL_SEED, index, size=size, style=style) for index in range(count)]
        self.pixels = source.pixels([scene.image for scene in scenes])  # (N, H, W, 3)
        self.items = [(i, qa["question"], qa["answer"]) for i, scene in enumerate(scenes) for qa in scene.qa]


def answer_kind(answer: str) -> str:
    return "colour" if answer in COLORS else "shape" if answer in SHAPES else "yes_no"


@torch.no_grad()
def stem_features(adapter, pixels: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """The adapter's stem features of pixels (N, H, W, 3), computed `chunk` images at a time: (N, R, D)."""
    return torch.cat([adapter.regions.stem(p.to(adapter.device)) for p in pixels.split(chunk)])  # (N, R, D)


@torch.no_grad()
def predicted_answers(adapter, features: torch.Tensor, items: list[tuple[int, str, str]], chunk: int = 256
                      ) -> list[int]:
    """The answer index the model gives each (scene, question, answer) item, reading its scene's row of the
    stem features (N, R, D), `chunk` questions at a time."""
    predicted = []
    for start in range(0, len(items), chunk):
        batch = items[start:start + chunk]
        scenes = torch.tensor([scene for scene, _, _ in batch], device=features.device)
        predicted += answer_logits(adapter, features[scenes], [q for _, q, _ in batch]).argmax(dim=1).tolist()
    return predicted


@torch.no_grad()
def evaluate(adapter, held_out: HeldOut, chunk: int = 256) -> dict[str, float]:
    """Answer accuracy on the held-out questions, overall and per kind of answer (colour, shape, yes/no)."""
    adapter.model.eval()
    predicted = predicted_answers(adapter, stem_features(adapter, held_out.pixels, chunk), held_out.items, chunk)
    adapter.model.train()
    correct = {kind: [] for kind in ("colour", "shape", "yes_no")}
    for (_, _, answer), guess in zip(held_out.items, predicted):
        correct[answer_kind(answer)].append(ANSWERS[guess] == answer)
    scores = {f"accuracy_{kind}": round(float(np.mean(hits)), 4) for kind, hits in correct.items() if hits}
    return {"accuracy": round(float(np.mean(sum(correct.values(), []))), 4), **scores}


def export(adapter, cfg: dict, held_out: HeldOut, out: Path, args: argparse.Namespace) -> dict:
    """The `hf:DIR` files in `out`; fp16 weights where held-out accuracy holds (±0.5 points)."""
    model, stem = adapter.model, adapter.regions.stem
    dtype, full, half = storage_dtype([model, stem], partial(evaluate, adapter, held_out), "accuracy")
    model.to("cpu", dtype).save_pretrained(out)
    model.float()
    adapter.tokenizer.save_pretrained(out)
    save_file({k: v.detach().to("cpu", dtype).contiguous() for k, v in stem.state_dict().items()}, str(out / STEM_FILE))
    regions = {**cfg["regions"], "stem": {**cfg["regions"]["stem"], "weights": STEM_FILE}}
    recipe = {"module": "xattn_cli.train.shapes_vqa", "family": args.family, "steps": args.steps, "seed": args.seed,
              "batch_size": args.batch_size, "lr": args.lr, "style": args.style,
              "storage": str(dtype).removeprefix("torch."),
              "held_out": {"seed": EVAL_SEED, "style": args.eval_style, "scenes": args.eval_scenes,
                           "questions": len(held_out.items), "fp32": full, "fp16": half}}
    (out / "xattn.json").write_text(json.dumps({"regions": regions, "recipe": recipe}, indent=2) + "\n")
    return recipe


def train(args: argparse.Namespace) -> dict:
    flush_denormals()
    torch.manual_seed(args.seed)
    cfg = json.loads(Path(args.config or CONFIG_DIR / f"shapes-{args.family}.json").read_text())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    adapter = build_adapter(cfg, args.family, write_tokenizer(out)).to(args.device)
    adapter.model.train()
    source, size = adapter.regions, cfg["image_size"]
    source.stem.to(args.device)
    head = cell_head(source.stem).to(args.device)
    parameters = [*adapter.model.parameters(), *source.stem.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=0.01)
    checkpoint = Checkpoint(out / "checkpoint.pt", {"model": adapter.model, "stem": source.stem, "cell_head": head},
                            optimizer, run_options(args))
    held_out = HeldOut(source, args.eval_scenes, size, args.eval_style)
    grid = GridRegions(source.grid, source.cell)  # the stem's input pixels, drawn without the stem
    fit(partial(training_batch, batch_size=args.batch_size, source=grid, size=size, style=args.style),
        partial(batch_loss, adapter, head, args.cell_weight), optimizer, checkpoint,
        partial(evaluate, adapter, held_out), out / "log.jsonl", steps=args.steps, lr=args.lr, warmup=args.warmup,
        eval_every=args.eval_every, workers=args.workers)
    return export(adapter, cfg, held_out, out, args)


def main(argv: list[str] | None = None) -> dict:
    parser = run_arguments(__doc__, steps=6000, lr=5e-4, warmup=200, eval_every=250)
    parser.add_argument("--family", choices=("lxmert", "visualbert"), required=True)
    parser.add_argument("--cell-weight", type=float, default=0.5, help="weight of the cells' shape/colour loss")
    return train(parser.parse_args(argv))


if __name__ == "__main__":
    main()
