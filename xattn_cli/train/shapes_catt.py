"""Train `shapes-catt-base` and `shapes-catt` as a pair (shared/reference/catt.md §4): the same initial weights
for every shared module, the same recipe and the same batches, on the confounded colour rule (default
biased:0.9); seeded and resumable.

    python -m xattn_cli.train.shapes_catt --out DIR --steps 2000 --seed 0 [--device cuda]

1. shapes-catt-base (no CS-ATT) trains for `--steps` steps → DIR/shapes-catt-base/.
2. The dictionary: k-means (K = the config's `dictionary_size`) over the base model's tokens that CS-ATT will
   read (the region tokens entering its last vision layer) on the first `--dictionary-scenes` training scenes,
   by the code `xattn dictionary build` runs (`dictionary.gather_tokens` + `build_dictionary`). The official
   code learns its dictionary instead; k-means over a trained model's features is the paper's text.
3. shapes-catt, from the same initial weights, with that dictionary frozen, trains on the same batches →
   DIR/shapes-catt/.
4. Its `dictionary.safetensors`: the entries' counts and member regions recomputed in the trained CATT's own
   tokens of the same scenes (members are named `train-<stream>/<scene index>`).

Batches, loss (answer CE + `--cell-weight` × per-cell shape/colour CE on the stem), schedule and held-out
evaluation (neutral stream 12000) are those of `train.shapes_vqa`, as are `--style` (training and dictionary
scenes) and `--eval-style` (held-out scenes). Each folder is a CATT model folder
(`models/catt.py`; `hf:DIR` loads it) plus `log.jsonl` and `checkpoint.pt`; a rerun with the same arguments
resumes.
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
from functools import partial
from pathlib import Path

import torch

from xattn_cli.config import CONFIG_DIR
from xattn_cli.device import flush_denormals
from xattn_cli.dictionary import build_dictionary, describe_entries, gather_tokens, save_dictionary
from xattn_cli.models.catt import DICTIONARY_FILE, build_catt, save_catt_folder
from xattn_cli.models.regions import GridRegions
from xattn_cli.train import Checkpoint, fit, run_arguments, run_options, storage_dtype
from xattn_cli.train.shapes_vqa import (
    ANSWERS, TRAIN_SEED, HeldOut, batch_loss, cell_head, evaluate, training_batch, write_tokenizer,
)
from xattn_cli.world.shapes import ColourRule, scene_at

BASE, CATT = "shapes-catt-base", "shapes-catt"


def initial_pair(cfg: dict, tokenizer, seed: int):
    """shapes-catt and shapes-catt-base with the same initial weights for every shared module (the base
    model's parameters are a subset of CATT's, by name), and one auxiliary cell head for each, equal."""
    torch.manual_seed(seed)
    catt = build_catt(cfg, tokenizer, ANSWERS, use_dictionary=True, name=CATT)
    head = cell_head(catt.regions.stem)
    base = build_catt(cfg, tokenizer, ANSWERS, use_dictionary=False, name=BASE)
    shared = catt.model.state_dict()
    base.model.load_state_dict({key: shared[key] for key in base.model.state_dict()})
    base.regions.stem.load_state_dict(catt.regions.stem.state_dict())
    return catt, copy.deepcopy(head), base, head


def scene_tokens(adapter, count: int, load, batch_size: int):
    """The tokens CS-ATT reads, of the first `count` training scenes (`load`: `scene_image` with the scenes'
    size, colour rule and style), as `xattn dictionary build` gathers them."""
    names = [f"train-{TRAIN_SEED}/{index}" for index in range(count)]
    adapter.model.eval()
    tokens = gather_tokens(adapter.dictionary_features, names, names, batch_size=batch_size, load=load)
    adapter.model.train()
    return tokens


def scene_image(name: str, size: int, colour_rule: ColourRule, style: str = "classic"):
    """The training scene a `train-<stream>/<index>` name stands for."""
    return scene_at(TRAIN_SEED, int(name.rsplit("/", 1)[1]), size=size, colour_rule=colour_rule, style=style).image


def fit_model(adapter, head, cfg: dict, out: Path, args: argparse.Namespace, held_out: HeldOut) -> None:
    """The shapes_vqa loop on `adapter` (its stem, cell head, every trainable parameter), into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    adapter.to(args.device)
    adapter.model.train()
    source = adapter.regions
    source.stem.to(args.device).train()
    head.to(args.device)
    parameters = [*adapter.model.parameters(), *source.stem.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=0.01)
    checkpoint = Checkpoint(out / "checkpoint.pt", {"model": adapter.model, "stem": source.stem, "cell_head": head},
                            optimizer, run_options(args))
    grid = GridRegions(source.grid, source.cell)
    batches = partial(training_batch, batch_size=args.batch_size, source=grid, size=cfg["image_size"],
                      colour_rule=ColourRule.parse(args.colour_rule), style=args.style)
    fit(batches, partial(batch_loss, adapter, head, args.cell_weight), optimizer, checkpoint,
        partial(evaluate, adapter, held_out), out / "log.jsonl", steps=args.steps, lr=args.lr, warmup=args.warmup,
        eval_every=args.eval_every, workers=args.workers)


def export(adapter, cfg: dict, held_out: HeldOut, out: Path, args: argparse.Namespace, vocabulary: Path) -> dict:
    """The model folder in `out`; fp16 weights where held-out accuracy holds (±0.5 points)."""
    dtype, full, half = storage_dtype([adapter.model, adapter.regions.stem], partial(evaluate, adapter, held_out),
                                      "accuracy")
    if not (out / "vocab.txt").is_file():
        shutil.copy(vocabulary, out / "vocab.txt")
    save_catt_folder(adapter, out, cfg["regions"], dtype)
    recipe = {"module": "xattn_cli.train.shapes_catt", "model": adapter.name, "steps": args.steps,
              "seed": args.seed, "batch_size": args.batch_size, "lr": args.lr, "colour_rule": args.colour_rule,
              "style": args.style, "dictionary_scenes": args.dictionary_scenes,
              "storage": str(dtype).removeprefix("torch."),
              "held_out": {"style": args.eval_style, "scenes": args.eval_scenes, "questions": len(held_out.items),
                           "fp32": full, "fp16": half}}
    xattn = json.loads((out / "xattn.json").read_text())
    (out / "xattn.json").write_text(json.dumps({**xattn, "recipe": recipe}, indent=2) + "\n")
    return recipe


def train(args: argparse.Namespace) -> dict:
    flush_denormals()
    cfg = json.loads(Path(args.config or CONFIG_DIR / "shapes-catt.json").read_text())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = write_tokenizer(out)
    catt, catt_head, base, base_head = initial_pair(cfg, tokenizer, args.seed)
    held_out = HeldOut(base.regions, args.eval_scenes, cfg["image_size"], args.eval_style)
    load = partial(scene_image, size=cfg["image_size"], colour_rule=ColourRule.parse(args.colour_rule),
                   style=args.style)

    fit_model(base, base_head, cfg, out / BASE, args, held_out)
    base_recipe = export(base, cfg, held_out, out / BASE, args, out / "vocab.txt")

    features = scene_tokens(base, args.dictionary_scenes, load, args.batch_size)
    dictionary = build_dictionary(features, cfg["model"]["dictionary_size"], seed=args.seed, load=load,
                                  info={"model": BASE, "feature": "causal attention queries (region tokens)"})
    catt.load_dictionary(dictionary)  # a frozen buffer: the optimizer never sees it
    fit_model(catt, catt_head, cfg, out / CATT, args, held_out)
    catt_recipe = export(catt, cfg, held_out, out / CATT, args, out / "vocab.txt")

    own = scene_tokens(catt, args.dictionary_scenes, load, args.batch_size)
    described = describe_entries(own, catt.model.causal.dictionary, load=load,
                                 info={**dictionary.info, "members_from": CATT})
    save_dictionary(out / CATT / DICTIONARY_FILE, described)
    return {BASE: base_recipe, CATT: catt_recipe}


def main(argv: list[str] | None = None) -> dict:
    parser = run_arguments(__doc__, steps=2000, lr=1e-3, warmup=100, eval_every=250)
    parser.add_argument("--colour-rule", default="biased:0.9", help="how colour follows shape in training scenes")
    parser.add_argument("--cell-weight", type=float, default=0.5, help="weight of the cells' shape/colour loss")
    parser.add_argument("--dictionary-scenes", type=int, default=1000, help="training scenes k-means reads")
    return train(parser.parse_args(argv))


if __name__ == "__main__":
    main()
