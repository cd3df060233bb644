"""What each model family's tokens are and what can explain them: the one table of family facts.

`models/` is the only package that knows model families: an adapter states once, in its `layout`, what its
tokens are and what can explain it, and everything outside `models/` reads that instead of a family name.
`models/` may import errors, tensors, device, capture, methods, text, cache and config; never explainers,
eval, io, render or cli. This module imports no torch, so the registry can list models without it.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    """What an adapter's tokens are and what can explain it.

    task: what the model answers — "classify" (labels), "image-text" (CLIP similarity), "vqa" (a question
        about regions), "detect" (boxes); it chooses the relevancy explainer.
    rule: how relevance propagates through its attention, one of `xattn_cli.methods.RULES`.
    explainers: the commands that apply ("surgery", "relevancy", "mask").
    prefix_tokens: tokens before the image patches (CLS, registers); relevance is read from token 0's row.
    visual: "patches" (a row-major grid at the input size; the adapter's `grid`) or "regions" (boxes).
    """

    task: str
    rule: str
    explainers: tuple[str, ...]
    prefix_tokens: int = 1
    visual: str = "patches"


LAYOUTS = {
    "clip": Layout("image-text", "self", ("surgery", "relevancy", "mask")),
    "vit": Layout("classify", "self", ("relevancy", "mask")),
    "lxmert": Layout("vqa", "bimodal", ("relevancy",), prefix_tokens=0, visual="regions"),
    "visualbert": Layout("vqa", "joint", ("relevancy",), prefix_tokens=0, visual="regions"),
    "catt": Layout("vqa", "causal", ("relevancy",), prefix_tokens=0, visual="regions"),
    "detr": Layout("detect", "encoder-decoder", ("relevancy",), prefix_tokens=0),
}
