"""Train `shapes-clip`: a tiny open_clip ViT CLIP on the shapes world (seeded, resumable).

    python -m xattn_cli.train.shapes_clip --steps 7000 --work /tmp/shapes-clip-run

Losses (DESIGN §7): multi-positive InfoNCE between images and object captions (a text is a positive
of every image that contains its object, so the 36 classes cause no false negatives), a zero-shot
loss against the 36 class captions, and an auxiliary shape head on the image embedding (dropped after
training) because shape is learnt far more slowly than colour. Half the captions are wrapped in one of
the 85 ensemble templates so that ensemble prompts stay in distribution. Training scenes are drawn in world style
`--style` (classic or varied), the held-out zero-shot scenes in `--eval-style` (shifted: the style-shifted
validation split); both go into the weights' metadata. `--init WEIGHTS` fine-tunes exported weights (e.g. the
classic-world run on the varied world) instead of starting from a random initialisation.
"""
from __future__ import annotations

import argparse
import math
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from xattn_cli.config import load_config
from xattn_cli.device import flush_denormals
from xattn_cli.errors import UsageError
from xattn_cli.models.checkpoints import load_into, load_state_dict
from xattn_cli.train import Checkpoint, add_style_arguments, fit, run_options
from xattn_cli.models.base import normalize
from xattn_cli.models.openclip import build_clip
from xattn_cli.text import WordTokenizer, build_vocabulary, ensemble_templates
from xattn_cli.world.shapes import COLORS, SHAPES, scene_at

CLASS_CAPTIONS = [f"a {color} {shape}" for shape in SHAPES for color in COLORS]  # index = shape * 6 + colour
TRAIN_SEED, EVAL_SEED = 1, 10_000
EXTRA_WORDS = CLASS_CAPTIONS + ["next to and , what colour shape is there yes no ?"]


def class_index(shape: str, color: str) -> int:
    return SHAPES.index(shape) * len(COLORS) + COLORS.index(color)


def normalize_pixels(images: np.ndarray | torch.Tensor, cfg: dict) -> torch.Tensor:
    """uint8 (B, H, W, 3) → normalised float (B, 3, H, W), with the model's mean and std."""
    return normalize(images, cfg["preprocess"]["mean"], cfg["preprocess"]["std"])


def training_batch(step: int, batch_size: int, size: int, templates: list[str], style: str = "classic") -> tuple:
    """Batch `step` of the training stream (drawn in world style `style`), a pure function of (seed, step): uint8
    images (B, H, W, 3), the classes present in each (B, 36), one object caption per image (half wrapped in a
    template) and its class (B,), and the 36 class captions as this step prompts them (half wrapped)."""
    rng = np.random.default_rng([TRAIN_SEED, step, 7])
    images, present, captions, caption_class = [], [], [], []
    for i in range(batch_size):
        n_objects = 1 if rng.random() < 0.4 else int(rng.integers(2, 5))
        scene = scene_at(TRAIN_SEED, step * batch_size + i, size=size, n_objects=n_objects, style=style)
        images.append(np.asarray(scene.image))
        labels = np.zeros(len(CLASS_CAPTIONS), dtype=np.float32)
        for obj in scene.objects:
            labels[class_index(obj.shape, obj.color)] = 1
        present.append(labels)
        obj = scene.objects[int(rng.integers(len(scene.objects)))]
        caption = obj.caption
        if rng.random() < 0.5:
            caption = templates[int(rng.integers(len(templates)))].format(caption)
        captions.append(caption)
        caption_class.append(class_index(obj.shape, obj.color))
    prompts = np.random.default_rng([TRAIN_SEED, step, 11])
    class_prompts = [templates[int(prompts.integers(len(templates)))].format(c) if prompts.random() < 0.5 else c
                     for c in CLASS_CAPTIONS]
    return np.stack(images), np.stack(present), captions, np.array(caption_class), class_prompts


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against targets spread uniformly over each row's positives."""
    weights = targets / targets.sum(dim=1, keepdim=True)
    return -(weights * logits.log_softmax(dim=1)).sum(dim=1).mean()


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, cfg: dict, n: int = 360, size: int = 64, style: str = "classic") -> float:
    """Top-1 over the 36 plain class captions on held-out single-object scenes drawn in world style `style`."""
    model.eval()
    scenes = [scene_at(EVAL_SEED, i, size=size, n_objects=1, style=style) for i in range(n)]
    pixels = normalize_pixels(np.stack([np.asarray(s.image) for s in scenes]), cfg)
    image_emb = F.normalize(model.encode_image(pixels), dim=-1)
    text_emb = F.normalize(model.encode_text(tokenizer(CLASS_CAPTIONS)), dim=-1)
    predicted = (image_emb @ text_emb.T).argmax(dim=1)
    truth = torch.tensor([class_index(s.objects[0].shape, s.objects[0].color) for s in scenes])
    model.train()
    return (predicted == truth).float().mean().item()


def train(args: argparse.Namespace) -> None:
    flush_denormals()
    torch.manual_seed(args.seed)
    cfg = load_config("shapes-clip")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = WordTokenizer(build_vocabulary(EXTRA_WORDS), cfg["arch"]["text_cfg"]["context_length"])
    model = build_clip(cfg["arch"], vocab_size=len(tokenizer.vocab)).train()
    if args.init:  # fine-tune: start from exported weights (same architecture and vocabulary)
        try:
            load_into(model, load_state_dict(args.init), args.init)
        except UsageError as error:
            raise SystemExit(f"error: {error}") from None
    shape_head = torch.nn.Linear(cfg["arch"]["embed_dim"], len(SHAPES))
    params = list(model.parameters()) + list(shape_head.parameters())
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98))

    def loss_fn(batch: tuple) -> tuple[torch.Tensor, dict]:
        images, present, captions, caption_class, class_prompts = batch
        pixels = normalize_pixels(images, cfg)
        present = torch.as_tensor(present)  # (B, 36)
        tokens = tokenizer(captions + class_prompts)  # (B + 36, ctx)
        image_emb, text_emb, logit_scale = model(pixels, tokens)
        caption_emb, class_emb = text_emb[: len(captions)], text_emb[len(captions):]
        positives = present[:, torch.as_tensor(caption_class)]  # (B images, B captions)
        logits = logit_scale * image_emb @ caption_emb.T  # (B, B)
        contrastive = 0.5 * (soft_cross_entropy(logits, positives) + soft_cross_entropy(logits.T, positives.T))
        zero_shot = soft_cross_entropy(logit_scale * image_emb @ class_emb.T, present)
        shapes_present = present.view(-1, len(SHAPES), len(COLORS)).amax(dim=2)  # (B, 6)
        shape_loss = F.binary_cross_entropy_with_logits(shape_head(image_emb * 10), shapes_present)
        parts = {"contrastive": contrastive, "zero_shot": zero_shot, "shape": shape_loss}
        return (contrastive + zero_shot + args.shape_weight * shape_loss,
                {name: round(part.item(), 4) for name, part in parts.items()})

    @torch.no_grad()
    def clamp_logit_scale() -> None:
        model.logit_scale.clamp_(0, math.log(100))

    make_batch = partial(training_batch, batch_size=args.batch_size, size=cfg["arch"]["vision_cfg"]["image_size"],
                         templates=ensemble_templates(), style=args.style)
    checkpoint = Checkpoint(work / "checkpoint.pt", {"model": model, "shape_head": shape_head}, optimizer,
                            run_options(args))
    fit(make_batch, loss_fn, optimizer, checkpoint,
        lambda: {"zero_shot_acc": zero_shot_accuracy(model, tokenizer, cfg, style=args.eval_style)},
        work / "log.jsonl", steps=args.steps, lr=args.lr, warmup=args.warmup, eval_every=args.eval_every, workers=1,
        after_step=clamp_logit_scale)
    export(model, tokenizer, work, args)


def export(model, tokenizer: WordTokenizer, work: Path, args: argparse.Namespace) -> None:
    """Weights as fp16 safetensors + the vocabulary file, in `work/` (copy to assets/ when final)."""
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(work / "shapes-clip.safetensors"),
              metadata={"recipe": "xattn_cli.train.shapes_clip", "steps": str(args.steps), "seed": str(args.seed),
                        "style": args.style, "eval_style": args.eval_style, "init": args.init or ""})
    tokenizer.save(work / "shapes-clip.vocab.txt")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/shapes-clip-run", help="checkpoints, log and exported weights")
    parser.add_argument("--steps", type=int, default=7000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--shape-weight", type=float, default=0.5)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", help="start from these exported weights (a shapes-clip .safetensors) instead of "
                                       "a random initialisation")
    add_style_arguments(parser)
    train(parser.parse_args(argv))


if __name__ == "__main__":
    main()
