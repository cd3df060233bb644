"""Options shared by the map commands (Annotated aliases, hf-style)."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer


class OutputFormat(str, Enum):
    table = "table"
    json = "json"
    jsonl = "jsonl"


class Precision(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


ImagesArg = Annotated[list[str], typer.Argument(help="Image files, folders (recursive), globs, or - to read paths from stdin.",
                                                show_default=False)]
PretrainedOpt = Annotated[Optional[str], typer.Option("--pretrained", help="Weights: an open_clip tag or a checkpoint file (.safetensors, .pt).")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output folder for overlays, maps and results.jsonl.")]
SaveMapsOpt = Annotated[bool, typer.Option("--save-maps", help="Also write each raw map as float32 .npy (H×W, [0, 1]).")]
FormatOpt = Annotated[Optional[OutputFormat], typer.Option("--format", "-f", help="stdout format [default: table on a terminal, jsonl when piped].", show_default=False)]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N, or (map commands) cuda:all: one worker process per visible GPU, into one --out.")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per forward pass.")]
PrecisionOpt = Annotated[Precision, typer.Option("--precision", help="fp32, or fp16/bf16 autocast (fp16 needs CUDA).")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Skip images whose ok record and files are already in --out.")]
MaxPixelsOpt = Annotated[int, typer.Option("--max-pixels", min=1, help="Refuse larger images (decompression-bomb guard).")]
WorkersOpt = Annotated[Optional[int], typer.Option("--workers", min=0, help="Image-decoding processes [default: 0 for short runs, else half the cores, at most 4].", show_default=False)]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", min=1, help="CPU threads for torch [default: half the usable cores; the rest decode and write].", show_default=False)]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar on stderr.")]
TrustCheckpointOpt = Annotated[bool, typer.Option("--trust-checkpoint", help="Allow pickle checkpoints that can run code (only for sources you trust).")]


class Overlays(str, Enum):
    png = "png"
    jpg = "jpg"
    none = "none"


OverlaysOpt = Annotated[Overlays, typer.Option("--overlays", help="Overlay files: png, jpg (quality 90), or none (maps and scores only).")]
class Layout(str, Enum):
    flat = "flat"
    tree = "tree"


LayoutOpt = Annotated[Layout, typer.Option("--layout", help="Artifacts all in --out (flat), or in folders mirroring the inputs' folders (tree: no folder holds millions of files).")]
ShardOpt = Annotated[Optional[str], typer.Option("--shard", metavar="I/N", help="Explain only shard I (0-based) of N: the inputs whose sha1(path) mod N is I. N runs cover every input once; `xattn merge` joins their --out folders.", show_default=False)]
