"""Train `shapes-detr`: a tiny Hugging Face DETR that finds the six shapes in shapes-world scenes (seeded,
resumable).

    python -m xattn_cli.train.shapes_detr --out DIR --steps 20000 [--device cuda]

A small ResNet backbone (no pretrained weights, every layer trained), a 2-layer encoder and 3-layer decoder,
10 object queries, classes = the six shapes; scenes of stream seed 4 (1–4 objects, 64 px). The loss is HF's
DETR set loss (`ImageLoss`: cross-entropy with the no-object class down-weighted, L1 and GIoU on normalised
(cx, cy, w, h) boxes, the same on every decoder layer) over the matching HF's `HungarianMatcher` defines, solved
exactly by `ExactMatcher` (HF's needs scipy), plus an auxiliary shape loss on each cell of the backbone's
feature map (its head is dropped after training). Held out: the first `--eval-scenes` scenes of stream seed 13000;
the metric is mAP@0.5 (`xattn_cli.eval.detection`), every query a detection scored by its best class. Training
scenes are drawn in world style `--style` (classic or varied), held-out ones in `--eval-style` (shifted: the
style-shifted validation split).

DIR ends up a `hf:DIR` folder: `config.json` + `model.safetensors` (fp16 where mAP holds),
`preprocessor_config.json` (input size, mean, std), `xattn.json` (the recipe's figures), `log.jsonl` and
`checkpoint.pt` (a rerun with the same arguments resumes from it).
"""
from __future__ import annotations

import argparse
import itertools
import json
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
import torch

from xattn_cli.config import CONFIG_DIR
from xattn_cli.device import flush_denormals
from xattn_cli.eval.detection import mean_average_precision
from xattn_cli.models.base import normalize
from xattn_cli.models.detr import DetrAdapter, boxes_to_pixels
from xattn_cli.train import Checkpoint, cell_labels, cell_loss, fit, run_arguments, run_options, storage_dtype
from xattn_cli.world.shapes import SHAPES, scene_at

TRAIN_SEED, EVAL_SEED = 4, 13_000
LOSS_WEIGHTS = ("loss_ce", "loss_bbox", "loss_giou")


def build_model(cfg: dict):
    """A fresh DetrForObjectDetection, every parameter trainable (HF freezes a ResNet's stem and first stage,
    which only makes sense for pretrained backbones)."""
    import transformers

    backbone = transformers.ResNetConfig(**cfg["backbone_config"])
    config = transformers.DetrConfig(**cfg["hf_config"], backbone_config=backbone, num_labels=len(SHAPES),
                                     id2label=dict(enumerate(SHAPES)), label2id={s: i for i, s in enumerate(SHAPES)})
    model = transformers.DetrForObjectDetection(config)
    model.requires_grad_(True)
    return model


def scene_targets(scene) -> dict[str, torch.Tensor]:
    """HF DETR labels of one scene: class indices (N,) and normalised (cx, cy, w, h) boxes (N, 4)."""
    width, height = scene.size
    scale = torch.tensor([width, height] * 2, dtype=torch.float32)
    corners = torch.tensor([o.box for o in scene.objects], dtype=torch.float32) / scale  # (N, 4)
    boxes = torch.cat([(corners[:, :2] + corners[:, 2:]) / 2, corners[:, 2:] - corners[:, :2]], dim=1)  # (N, 4)
    return {"class_labels": torch.tensor([SHAPES.index(o.shape) for o in scene.objects]), "boxes": boxes}


def backbone_grid(cfg: dict) -> tuple[int, int]:
    """The (h, w) of the backbone's feature map: a ResNet's stem has stride 4 and each later stage halves."""
    stride = 4 * 2 ** (len(cfg["backbone_config"]["hidden_sizes"]) - 1)
    return cfg["image_size"] // stride, cfg["image_size"] // stride


def training_batch(step: int, batch_size: int, size: int, mean: list[float], std: list[float],
                   grid: tuple[int, int], style: str = "classic"):
    """Normalised pixels (B, 3, H, W) of scenes step·B … step·B + B − 1 (in world style `style`), their labels,
    and the shape under each cell of the backbone's feature map (B, R, 1)."""
    scenes = [scene_at(TRAIN_SEED, index, size=size, style=style)
              for index in range(step * batch_size, (step + 1) * batch_size)]
    pixels = normalize(np.stack([np.asarray(s.image) for s in scenes]), mean, std)
    return pixels, [scene_targets(s) for s in scenes], torch.stack([cell_labels(s, grid)[:, :1] for s in scenes])


def cell_head(cfg: dict) -> torch.nn.Linear:
    """The auxiliary head (training only) that reads the shape under each backbone cell (6 shapes + background)."""
    return torch.nn.Linear(cfg["backbone_config"]["hidden_sizes"][-1], len(SHAPES) + 1)


@lru_cache(maxsize=None)
def query_choices(queries: int, objects: int) -> torch.Tensor:
    """Every ordered choice of `objects` distinct queries. (queries! / (queries − objects)!, objects)."""
    return torch.tensor(list(itertools.permutations(range(queries), objects)), dtype=torch.long).view(-1, objects)


class ExactMatcher(torch.nn.Module):
    """The cost of HF's `HungarianMatcher` (−p(class), L1 and −GIoU of the boxes, weighted by the config's
    class/bbox/giou costs) with its minimum-cost one-to-one assignment found by trying every choice of queries:
    exact, and cheap for a shapes scene's ≤ 4 objects (5,040 choices among 10 queries)."""

    def __init__(self, config):
        super().__init__()
        self.weights = (config.class_cost, config.bbox_cost, config.giou_cost)

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        from transformers.image_transforms import center_to_corners_format
        from transformers.loss.loss_for_object_detection import generalized_box_iou

        class_weight, bbox_weight, giou_weight = self.weights
        indices = []
        for logits, boxes, target in zip(outputs["logits"], outputs["pred_boxes"], targets):
            truth = target["boxes"]
            giou = generalized_box_iou(center_to_corners_format(boxes), center_to_corners_format(truth))  # (Q, N)
            cost = (-class_weight * logits.softmax(-1)[:, target["class_labels"]]
                    + bbox_weight * torch.cdist(boxes, truth, p=1) - giou_weight * giou)  # (Q, N)
            cost = torch.nan_to_num(cost.float().cpu(), nan=1e9, posinf=1e9, neginf=1e9)
            choices = query_choices(len(boxes), len(truth))  # (K, N)
            objects = torch.arange(len(truth))
            best = cost[choices, objects].sum(dim=1).argmin()
            indices.append((choices[best], objects))
        return indices


def set_loss(config):
    """HF's DETR criterion with our matcher, and the weights HF gives its terms."""
    from transformers.loss.loss_for_object_detection import ImageLoss

    criterion = ImageLoss(ExactMatcher(config), config.num_labels, config.eos_coefficient,
                          ["labels", "boxes", "cardinality"])
    weights = dict(zip(LOSS_WEIGHTS, (1.0, config.bbox_loss_coefficient, config.giou_loss_coefficient)))
    return criterion, weights


def batch_loss(model, criterion, weights: dict, head: torch.nn.Linear, cell_weight: float, batch
               ) -> tuple[torch.Tensor, dict]:
    """The set loss on the last decoder layer, plus on every earlier one when `auxiliary_loss` is on, plus
    `cell_weight` × the cross-entropy of the shape under each backbone cell (DESIGN §7: a shape-first signal;
    DETR's matched queries alone learn where objects are long before what they are)."""
    pixels, targets, cells = batch
    device = model.device
    targets = [{key: value.to(device) for key, value in target.items()} for target in targets]
    backbone, feature_maps = model.model.backbone.model, []
    hook = backbone.register_forward_hook(lambda module, inputs, output: feature_maps.append(output.feature_maps[-1]))
    try:
        output = model.model(pixel_values=pixels.to(device))
    finally:
        hook.remove()
    cell = cell_loss(head(feature_maps[0].flatten(2).transpose(1, 2)), cells.to(device))  # features (B, R, C)
    outputs = {"logits": model.class_labels_classifier(output.last_hidden_state),  # (B, Q, C + 1)
               "pred_boxes": model.bbox_predictor(output.last_hidden_state).sigmoid()}  # (B, Q, 4)
    if model.config.auxiliary_loss:
        earlier = output.intermediate_hidden_states[:-1]  # (L − 1, B, Q, D)
        outputs["auxiliary_outputs"] = [{"logits": model.class_labels_classifier(h),
                                         "pred_boxes": model.bbox_predictor(h).sigmoid()} for h in earlier]
    parts = criterion(outputs, targets)
    loss = sum(value * weights[key.rsplit("_", 1)[0] if key not in weights else key]
               for key, value in parts.items() if key.startswith(LOSS_WEIGHTS))
    logged = {key: round(parts[key].item(), 4) for key in LOSS_WEIGHTS}
    return loss + cell_weight * cell, {**logged, "cells": round(cell.item(), 4)}


class HeldOut:
    """The first `count` scenes of the held-out stream, drawn in world style `style`: pixels and ground truth in
    pixels."""

    def __init__(self, count: int, size: int, mean: list[float], std: list[float], style: str = "classic"):
        scenes = [scene_at(EVAL_SEED, index, size=size, style=style) for index in range(count)]
        self.pixels = normalize(np.stack([np.asarray(s.image) for s in scenes]), mean, std)  # (N, 3, H, W)
        self.truths = [[(SHAPES.index(o.shape), o.box) for o in s.objects] for s in scenes]
        self.size = (size, size)


@torch.no_grad()
def evaluate(adapter: DetrAdapter, held_out: HeldOut, chunk: int = 128) -> dict[str, float]:
    """mAP@0.5 on the held-out scenes, through the adapter the explainers use."""
    adapter.model.eval()
    detections = []
    for pixels in held_out.pixels.split(chunk):
        logits, boxes = adapter.detect(pixels.to(adapter.device))  # (b, Q, C + 1), (b, Q, 4)
        scores, labels = logits.softmax(dim=-1)[..., :-1].max(dim=-1)  # (b, Q)
        corners = boxes_to_pixels(boxes.float(), held_out.size)  # (b, Q, 4)
        detections += [list(zip(l.tolist(), s.tolist(), c.tolist())) for l, s, c in zip(labels, scores, corners)]
    adapter.model.train()
    result = mean_average_precision(detections, held_out.truths, threshold=0.5)
    return {"map50": round(result["map"], 4), **{f"ap50_{SHAPES[c]}": round(ap, 4) for c, ap in result["ap"].items()}}


def export(adapter: DetrAdapter, cfg: dict, held_out: HeldOut, out: Path, args: argparse.Namespace) -> dict:
    """The `hf:DIR` files in `out`; fp16 weights where held-out mAP holds (±0.005)."""
    model = adapter.model
    dtype, full, half = storage_dtype([model], partial(evaluate, adapter, held_out), "map50")
    model.to("cpu", dtype).save_pretrained(out)
    model.float()
    size = cfg["image_size"]
    processor = {"size": {"height": size, "width": size}, "image_mean": cfg["preprocess"]["mean"],
                 "image_std": cfg["preprocess"]["std"]}
    (out / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    recipe = {"module": "xattn_cli.train.shapes_detr", "steps": args.steps, "seed": args.seed,
              "batch_size": args.batch_size, "lr": args.lr, "style": args.style,
              "storage": str(dtype).removeprefix("torch."),
              "held_out": {"seed": EVAL_SEED, "style": args.eval_style, "scenes": args.eval_scenes, "fp32": full,
                           "fp16": half}}
    (out / "xattn.json").write_text(json.dumps({"recipe": recipe}, indent=2) + "\n")
    return recipe


def train(args: argparse.Namespace) -> dict:
    flush_denormals()
    torch.manual_seed(args.seed)
    cfg = json.loads(Path(args.config or CONFIG_DIR / "shapes-detr.json").read_text())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    size, mean, std = cfg["image_size"], cfg["preprocess"]["mean"], cfg["preprocess"]["std"]
    adapter = DetrAdapter(build_model(cfg), name="shapes-detr", size=(size, size)).to(args.device)
    adapter.mean, adapter.std = mean, std
    model = adapter.model.train()
    head = cell_head(cfg).to(args.device)
    optimizer = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=args.lr, weight_decay=1e-4)
    checkpoint = Checkpoint(out / "checkpoint.pt", {"model": model, "cell_head": head}, optimizer, run_options(args))
    criterion, weights = set_loss(model.config)
    held_out = HeldOut(args.eval_scenes, size, mean, std, args.eval_style)
    draw = partial(training_batch, batch_size=args.batch_size, size=size, mean=mean, std=std, grid=backbone_grid(cfg),
                   style=args.style)
    loss = partial(batch_loss, model, criterion.to(args.device), weights, head, args.cell_weight)
    fit(draw, loss, optimizer, checkpoint, partial(evaluate, adapter, held_out), out / "log.jsonl", steps=args.steps,
        lr=args.lr, warmup=args.warmup, eval_every=args.eval_every, workers=args.workers)
    return export(adapter, cfg, held_out, out, args)


def main(argv: list[str] | None = None) -> dict:
    parser = run_arguments(__doc__, steps=20000, lr=3e-4, warmup=300, eval_every=500)
    parser.add_argument("--cell-weight", type=float, default=0.5, help="weight of the backbone cells' shape loss")
    return train(parser.parse_args(argv))


if __name__ == "__main__":
    main()
