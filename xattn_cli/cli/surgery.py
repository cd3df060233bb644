"""`xattn surgery`: CLIP Surgery similarity maps for one or more texts.

Usage:
    xattn surgery scene.png --text "a red circle" --text "a blue star"
    find imgs -name '*.jpg' | xattn surgery - --text dog --model openclip:ViT-B-16 --pretrained ckpt.safetensors
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from xattn_cli.cli import _options as opt
from xattn_cli.cli._run import load_adapter, require_not_empty, run_map_command
from xattn_cli.errors import UsageError


def parse_size(size: str | int | None) -> tuple[int, int] | None:
    """'224' → (224, 224); '320x240' (W×H) → (240, 320) as (H, W); None stays None."""
    if size is None:
        return None
    text = str(size).lower()
    width, separator, height = text.partition("x")
    try:
        width_px, height_px = int(width), int(height if separator else width)
    except ValueError:
        raise UsageError(f"bad --size {size!r}: use N or WxH, e.g. 224 or 320x240") from None
    if not (8 <= width_px <= 4096 and 8 <= height_px <= 4096):
        raise UsageError(f"bad --size {size!r}: each side must be in 8..4096 pixels")
    return height_px, width_px


def surgery(
    images: opt.ImagesArg,
    text: Annotated[list[str], typer.Option("--text", "-t", help="A class name or phrase; repeat for several.")],
    model: Annotated[str, typer.Option("--model", "-m", help="Model name (see `xattn models`).")] = "shapes-clip",
    pretrained: opt.PretrainedOpt = None,
    trust_checkpoint: opt.TrustCheckpointOpt = False,
    out: opt.OutOpt = Path("xattn-out"),
    save_maps: opt.SaveMapsOpt = False,
    points: Annotated[int, typer.Option("--points", min=0, help="Add up to K SAM-style positive points per target.")] = 0,
    ensemble: Annotated[bool, typer.Option("--ensemble/--no-ensemble", help="Wrap texts in the 85 prompt templates.")] = True,
    text_cache: Annotated[bool, typer.Option("--text-cache/--no-text-cache", help="Reuse text embeddings across runs (cached under $XATTN_CACHE_DIR or ~/.cache/xattn).")] = True,
    size: Annotated[Optional[str], typer.Option("--size", help="Model input size, N or WxH [default: the model's].")] = None,
    blocks: Annotated[Optional[int], typer.Option("--blocks", min=1, help="Last blocks given the v-v path [default: min(6, depth) or the model config].")] = None,
    output_format: opt.FormatOpt = None,
    device: opt.DeviceOpt = "auto",
    batch_size: opt.BatchSizeOpt = 8,
    precision: opt.PrecisionOpt = opt.Precision.fp32,
    resume: opt.ResumeOpt = False,
    max_pixels: opt.MaxPixelsOpt = 64_000_000,
    workers: opt.WorkersOpt = None,
    threads: opt.ThreadsOpt = None,
    overlays: opt.OverlaysOpt = opt.Overlays.png,
    layout: opt.LayoutOpt = opt.Layout.flat,
    shard: opt.ShardOpt = None,
    quiet: opt.QuietOpt = False,
) -> None:
    """CLIP Surgery: where in each image is each text? Writes overlays and prints scores."""
    require_not_empty(text=text)

    def build(device_name: str):
        from xattn_cli.explainers.surgery import SurgeryExplainer

        adapter = load_adapter(model, pretrained, device_name, trust_checkpoint)
        return SurgeryExplainer(adapter, text, ensemble=ensemble, size=parse_size(size), blocks=blocks,
                                points=points, precision=precision.value, text_cache=text_cache)

    run_map_command(images, build, out=out, save_maps=save_maps, output_format=output_format, device=device,
                    batch_size=batch_size, resume=resume, max_pixels=max_pixels, quiet=quiet,
                    workers=workers, threads=threads, layout=layout, overlays=overlays, shard=shard, made_by=(model, "surgery"))
