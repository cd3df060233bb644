"""`xattn mask`: learned token masks — the patches of a fixed budget that keep the model's decision.

Usage:
    xattn mask scene.png                                   # shapes-vit, its predicted shapes, 25 % of patches
    xattn mask scene.png --target star --keep-ratio 0.1
    xattn mask scene.png --model shapes-clip --text "a red circle" --steps 50 --seed 1
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from xattn_cli.cli import _options as opt
from xattn_cli.cli._run import load_adapter, require_not_empty, run_map_command


def mask(
    images: opt.ImagesArg,
    model: Annotated[str, typer.Option("--model", "-m", help="Model name (see `xattn models`): a ViT classifier or a CLIP ViT model.")] = "shapes-vit",
    target: Annotated[Optional[list[str]], typer.Option("--target", help="Classifiers: a label or index [default: the predicted class(es)].")] = None,
    text: Annotated[Optional[list[str]], typer.Option("--text", "-t", help="CLIP models: a text to explain; repeat for several.")] = None,
    labels: Annotated[Optional[Path], typer.Option("--labels", help="Classifiers: names of the classes, a JSON list, a JSON map or one name a line.", show_default=False)] = None,
    keep_ratio: Annotated[float, typer.Option("--keep-ratio", help="Fraction of the patches kept (exactly round(ratio × patches), at least one).")] = 0.25,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Optimisation steps per image and target.")] = 100,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the Gumbel noise (per image content and target, never batch position).")] = 0,
    pretrained: opt.PretrainedOpt = None,
    trust_checkpoint: opt.TrustCheckpointOpt = False,
    out: opt.OutOpt = Path("xattn-out"),
    save_maps: opt.SaveMapsOpt = False,
    output_format: opt.FormatOpt = None,
    device: opt.DeviceOpt = "auto",
    batch_size: opt.BatchSizeOpt = 8,
    resume: opt.ResumeOpt = False,
    max_pixels: opt.MaxPixelsOpt = 64_000_000,
    workers: opt.WorkersOpt = None,
    threads: opt.ThreadsOpt = None,
    overlays: opt.OverlaysOpt = opt.Overlays.png,
    layout: opt.LayoutOpt = opt.Layout.flat,
    shard: opt.ShardOpt = None,
    quiet: opt.QuietOpt = False,
) -> None:
    """Token masks: the patches that alone keep the model's decision (after MEAT's Gumbel-softmax masks).
    --save-maps writes each mask as a 0/1 .npy at the image's size."""
    require_not_empty(text=text)

    def build(device_name: str):
        from xattn_cli.explainers.mask import MaskExplainer
        from xattn_cli.methods.token_mask import MaskSettings

        adapter = load_adapter(model, pretrained, device_name, trust_checkpoint, labels)
        return MaskExplainer(adapter, targets=target or [], texts=text or [],
                             settings=MaskSettings(ratio=keep_ratio, steps=steps), seed=seed)

    run_map_command(images, build, out=out, save_maps=save_maps, output_format=output_format, device=device,
                    batch_size=batch_size, resume=resume, max_pixels=max_pixels, quiet=quiet, workers=workers,
                    threads=threads, layout=layout, overlays=overlays, shard=shard, made_by=(model, "mask"))
