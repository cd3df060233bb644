"""Train `shapes-vit`: a tiny Hugging Face ViT that says which shapes a scene holds (seeded, resumable).

    python -m xattn_cli.train.shapes_vit --steps 3000 --work /tmp/shapes-vit-run

Scenes hold 1–3 objects of distinct shapes in random colours; the loss is binary cross-entropy over
the six shapes. Training scenes are drawn in world style `--style` (classic or varied), held-out ones in
`--eval-style` (shifted: the style-shifted validation split); both go into the weights' metadata.
"""
from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from xattn_cli.config import load_config
from xattn_cli.device import flush_denormals
from xattn_cli.models.base import normalize
from xattn_cli.models.vit import build_vit
from xattn_cli.train import Checkpoint, add_style_arguments, fit, run_options
from xattn_cli.world.shapes import SHAPES, scene_at

TRAIN_SEED, EVAL_SEED = 2, 11_000
WARMUP = 200  # steps


def scene_batch(seed: int, start: int, count: int, size: int, cfg: dict, style: str = "classic"
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised pixels (B, 3, H, W) and multi-hot shapes (B, 6) for scenes start..start+count, drawn in world
    style `style`."""
    images, labels = [], []
    for index in range(start, start + count):
        scene = scene_at(seed, index, size=size, n_objects=1 + index % 3, distinct_shapes=True, style=style)
        images.append(np.asarray(scene.image))
        labels.append([float(any(o.shape == s for o in scene.objects)) for s in SHAPES])
    return normalize(np.stack(images), cfg["preprocess"]["mean"], cfg["preprocess"]["std"]), torch.tensor(labels)


def training_batch(step: int, batch_size: int, size: int, cfg: dict, style: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch `step` of the training stream: scenes step·B … step·B + B − 1."""
    return scene_batch(TRAIN_SEED, step * batch_size, batch_size, size, cfg, style)


@torch.no_grad()
def evaluate(model, cfg: dict, n: int = 600, style: str = "classic") -> dict[str, float]:
    """Per-shape (binary) accuracy and exact-set accuracy on held-out scenes drawn in world style `style`."""
    model.eval()
    pixels, labels = scene_batch(EVAL_SEED, 0, n, cfg["hf_config"]["image_size"], cfg, style)
    predicted = (model(pixel_values=pixels).logits > 0).float()
    model.train()
    return {"per_shape_accuracy": (predicted == labels).float().mean().item(),
            "exact_set_accuracy": (predicted == labels).all(dim=1).float().mean().item()}


def train(args: argparse.Namespace) -> None:
    flush_denormals()
    torch.manual_seed(args.seed)
    cfg = load_config("shapes-vit")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = build_vit(cfg).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)

    def loss_fn(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        pixels, labels = batch
        return F.binary_cross_entropy_with_logits(model(pixel_values=pixels).logits, labels), {}

    make_batch = partial(training_batch, batch_size=args.batch_size, size=cfg["hf_config"]["image_size"], cfg=cfg,
                         style=args.style)
    checkpoint = Checkpoint(work / "checkpoint.pt", {"model": model}, optimizer, run_options(args))
    fit(make_batch, loss_fn, optimizer, checkpoint,
        partial(evaluate, model, cfg, style=args.eval_style), work / "log.jsonl", steps=args.steps, lr=args.lr,
        warmup=WARMUP, eval_every=args.eval_every, workers=1)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(work / "shapes-vit.safetensors"),
              metadata={"recipe": "xattn_cli.train.shapes_vit", "steps": str(args.steps), "seed": str(args.seed),
                        "style": args.style, "eval_style": args.eval_style})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/shapes-vit-run")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    add_style_arguments(parser)
    train(parser.parse_args(argv))


if __name__ == "__main__":
    main()
