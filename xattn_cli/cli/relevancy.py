"""`xattn relevancy`: gradient-weighted relevancy propagation (Chefer et al.) and attention baselines.

Usage:
    xattn relevancy scene.png                              # shapes-vit, its predicted shapes
    xattn relevancy scene.png --target star --method rollout
    xattn relevancy scene.png --model shapes-clip --text "a red circle"
    xattn relevancy scene.png --model hf:LXMERT_DIR --question "what colour is the star?" --features regions.npz
    xattn relevancy scene.png --model hf:DETR_DIR --threshold 0.7     # one map per detection
"""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from xattn_cli.cli import _options as opt
from xattn_cli.cli._run import run_map_command


class Method(str, Enum):
    chefer = "chefer"
    rollout = "rollout"
    raw = "raw"
    attn_gradcam = "attn-gradcam"


def relevancy(
    images: opt.ImagesArg,
    model: Annotated[str, typer.Option("--model", "-m", help="Model name (see `xattn models`).")] = "shapes-vit",
    text: Annotated[Optional[list[str]], typer.Option("--text", "-t", help="CLIP models: a text to explain; repeat for several.")] = None,
    target: Annotated[Optional[list[str]], typer.Option("--target", help="Classifiers: a label or index [default: the predicted class(es)].")] = None,
    question: Annotated[Optional[list[str]], typer.Option("--question", help="VQA models (LXMERT, VisualBERT): a question to explain; repeat for several.")] = None,
    answer: Annotated[Optional[str], typer.Option("--answer", help="VQA models: explain this answer, a label or an index [default: the predicted one].")] = None,
    labels: Annotated[Optional[Path], typer.Option("--labels", help="Classifiers and VQA models: names of the classes or answers, a JSON list, a JSON map (index → name or name → index) or one name a line.", show_default=False)] = None,
    features: Annotated[Optional[Path], typer.Option("--features", help="VQA models: region boxes + features per image, .npz (names, features, boxes[, counts]) [default: the model's grid regions].", show_default=False)] = None,
    threshold: Annotated[Optional[float], typer.Option("--threshold", min=0.0, max=1.0, help="DETR: explain each detection whose class probability exceeds this [default: 0.5].", show_default=False)] = None,
    method: Annotated[Method, typer.Option("--method", help="chefer (gradient-weighted rollout of relevancy), rollout, raw or attn-gradcam (LXMERT, VisualBERT, DETR: no rollout).")] = Method.chefer,
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
    quiet: opt.QuietOpt = False,
) -> None:
    """Relevancy maps: which image regions (and text tokens) drive the model's output."""

    def build(device_name: str):
        from xattn_cli.explainers.relevancy import build_relevancy
        from xattn_cli.models.registry import load_model

        adapter = load_model(model, pretrained, device_name, trust_checkpoint=trust_checkpoint)
        if labels is not None:
            from xattn_cli.models.labels import apply_labels

            apply_labels(adapter, labels)
        return build_relevancy(adapter, method=method.value, texts=text or [], targets=target or [],
                               start_layer=start_layer, precision=precision.value, questions=question or [],
                               answer=answer, features=features, threshold=threshold)

    run_map_command(images, build, out=out, save_maps=save_maps, output_format=output_format, device=device,
                    batch_size=batch_size, resume=resume, max_pixels=max_pixels, quiet=quiet,
                    workers=workers)
