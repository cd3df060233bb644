"""`xattn relevancy`: gradient-weighted relevancy propagation (Chefer et al.) and attention baselines.

Usage:
    xattn relevancy scene.png                              # shapes-vit, its predicted shapes
    xattn relevancy scene.png --target star --method rollout
    xattn relevancy scene.png --model shapes-clip --text "a red circle"
    xattn relevancy scene.png --model hf:LXMERT_DIR --question "what colour is the star?" --features regions.npz
    xattn relevancy scene.png --model hf:DETR_DIR --threshold 0.7     # one map per detection
    xattn relevancy scene.png --model shapes-catt --question "what colour is the star?" --dictionary d.safetensors
"""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from xattn_cli.cli import _options as opt
from xattn_cli.cli._run import load_adapter, require_not_empty, run_map_command
from xattn_cli.methods import METHODS, RESIDUAL_RULES, method_names


Method = Enum("Method", {name: name for name in method_names("relevancy")}, type=str)  # the registry's names
Residual = Enum("Residual", {name: name for name in RESIDUAL_RULES}, type=str)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def relevancy(
    images: opt.ImagesArg,
    model: Annotated[str, typer.Option("--model", "-m", help="Model name (see `xattn models`).")] = "shapes-vit",
    text: Annotated[Optional[list[str]], typer.Option("--text", "-t", help="CLIP models: a text to explain; repeat for several.")] = None,
    target: Annotated[Optional[list[str]], typer.Option("--target", help="Classifiers: a label or index [default: the predicted class(es)].")] = None,
    question: Annotated[Optional[list[str]], typer.Option("--question", help="VQA models (LXMERT, VisualBERT, CATT): a question to explain; repeat for several.")] = None,
    answer: Annotated[Optional[str], typer.Option("--answer", help="VQA models: explain this answer, a label or an index [default: the predicted one].")] = None,
    labels: Annotated[Optional[Path], typer.Option("--labels", help="Classifiers and VQA models: names of the classes or answers, a JSON list, a JSON map (index → name or name → index) or one name a line.", show_default=False)] = None,
    features: Annotated[Optional[Path], typer.Option("--features", help="VQA models: region boxes + features per image, .npz (names, features, boxes[, counts]) [default: the model's grid regions].", show_default=False)] = None,
    dictionary: Annotated[Optional[Path], typer.Option("--dictionary", help="Models with causal attention (CATT): use this dictionary file (`xattn dictionary build`; the model's K entries of its width) instead of the model's own. This changes the model: its answers may change.", show_default=False)] = None,
    threshold: Annotated[Optional[float], typer.Option("--threshold", min=0.0, max=1.0, help="DETR: explain each detection whose class probability exceeds this [default: 0.5].", show_default=False)] = None,
    method: Annotated[Method, typer.Option("--method", help="; ".join(f"{name}: {METHODS[name].summary}" for name in method_names("relevancy")) + ".")] = "chefer",
    residual: Annotated[Optional[Residual], typer.Option("--residual", help="DETR: rows the residual normalisation divides 0/0 — guarded (left as identity) or official (NaN, then 0, as the official code) [default: guarded].", show_default=False)] = None,
    start_layer: Annotated[Optional[int], typer.Option("--start-layer", min=0, help="First layer accumulated [default: 0 for ViT, the last layer for CLIP].")] = None,
    pretrained: opt.PretrainedOpt = None,
    trust_checkpoint: opt.TrustCheckpointOpt = False,
    out: opt.OutOpt = Path("xattn-out"),
    save_maps: opt.SaveMapsOpt = False,
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
    """Relevancy maps: which image regions (and text tokens) drive the model's output."""
    require_not_empty(text=text, question=question)

    def build(device_name: str):
        from xattn_cli.explainers import build_relevancy

        adapter = load_adapter(model, pretrained, device_name, trust_checkpoint, labels)
        return build_relevancy(adapter, method=Method(method).value, texts=text or [], targets=target or [],
                               start_layer=start_layer, precision=precision.value, questions=question or [],
                               answer=answer, features=features, threshold=threshold,
                               residual=None if residual is None else residual.value, dictionary=dictionary,
                               spell=_flag)

    run_map_command(images, build, out=out, save_maps=save_maps, output_format=output_format, device=device,
                    batch_size=batch_size, resume=resume, max_pixels=max_pixels, quiet=quiet,
                    workers=workers, threads=threads, layout=layout, overlays=overlays, shard=shard,
                    made_by=(model, Method(method).value))
