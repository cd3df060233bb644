"""Relevancy maps (Chefer et al. and baselines) for ViT classifiers and CLIP image–text pairs."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from xattn_cli.capture import AttentionRecorder
from xattn_cli.explainers.base import autocast
from xattn_cli.errors import UsageError
from xattn_cli.io.images import ItemError
from xattn_cli.methods.relevancy import METHODS, NEEDS_GRADIENTS, token_relevance
from xattn_cli.methods.surgery import min_max
from xattn_cli.results import TargetMap, token_relevances


@contextlib.contextmanager
def frozen_parameters(model: torch.nn.Module) -> Iterator[None]:
    """No parameter collects a gradient for the duration; flags are restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for parameter, _ in flags:
            parameter.requires_grad_(False)
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


@contextlib.contextmanager
def input_gradients_only(model: torch.nn.Module, needed: bool = True) -> Iterator[None]:
    """Gradients flow to the inputs (and so through every attention map), never into parameters.

    Parameters are frozen for the duration; embedding outputs are made to require grad so that token
    inputs (integers) still give the text tower a graph. Methods without gradients run under no_grad.
    """
    if not needed:
        with torch.no_grad():
            yield
        return
    handles = [m.register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
               for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    with _gradients_with_hooks(model, handles):
        yield


@contextlib.contextmanager
def _gradients_with_hooks(model: torch.nn.Module, handles: list) -> Iterator[None]:
    """Gradients on and parameters frozen while the registered `handles` live; they are removed after."""
    try:
        with frozen_parameters(model), torch.enable_grad():
            yield
    finally:
        for handle in handles:
            handle.remove()


def _start_graph_here(_module: torch.nn.Module, args: tuple, kwargs: dict, *,
                      batch_size: int | None = None) -> tuple[tuple, dict] | None:
    """Forward pre-hook: the module's hidden-state input becomes a fresh leaf that requires grad.

    With `batch_size`, a batch-1 input (one text, the same for every image) is widened to the batch here, so
    the blocks below run once and each sample still gets its own gradient from this block on.
    """
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not torch.is_tensor(hidden):
        return None
    start = hidden.detach()
    if batch_size is not None and start.shape[0] == 1 < batch_size:
        start = start.expand(batch_size, *start.shape[1:]).clone()  # (1, L, D) → (B, L, D)
    start.requires_grad_(True)
    swap = lambda value: start if value is hidden else value  # noqa: E731  (q, k and v may be one tensor)
    return tuple(swap(value) for value in args), {key: swap(value) for key, value in kwargs.items()}


@contextlib.contextmanager
def gradients_from(model: torch.nn.Module, starts: Sequence[torch.nn.Module],
                   batch_size: int | None = None) -> Iterator[None]:
    """The autograd graph begins at the input of each module in `starts` (per stream, the first attention
    block whose gradient a method uses), so each backward pass stops there instead of running down to the
    pixels: the gradients of that block's and every later attention map are unchanged. Parameters are frozen.
    With `batch_size`, batch-1 inputs are widened there (`_start_graph_here`).
    """
    hook = functools.partial(_start_graph_here, batch_size=batch_size)
    handles = [module.register_forward_pre_hook(hook, with_kwargs=True) for module in starts]
    with _gradients_with_hooks(model, handles):
        yield


def first_gradient_layer(method: str, last_layer: int, start_layer: int) -> int:
    """The first layer whose gradient `method` reads: attn-gradcam only the last, the others from `start_layer`."""
    return last_layer if method == "attn-gradcam" else start_layer


def first_gradient_sites(sites: Sequence, method: str, start_layers: dict[str, int]) -> list[torch.nn.Module]:
    """Per stream, the module of the first layer whose gradient `method` reads."""
    modules = []
    for stream, start_layer in start_layers.items():
        layers = sorted((site.layer, index) for index, site in enumerate(sites) if site.stream == stream)
        if not layers:
            continue
        first = first_gradient_layer(method, layers[-1][0], start_layer)
        chosen = [index for layer, index in layers if layer >= first]
        if chosen:
            modules.append(sites[chosen[0]].module)
    return modules


def method_gradients(method: str, model: torch.nn.Module, sites: Sequence, start_layers: dict[str, int],
                     batch_size: int | None = None) -> contextlib.AbstractContextManager:
    """no_grad for gradient-free methods; else a graph from the first block the method reads."""
    if not NEEDS_GRADIENTS[method]:
        return torch.no_grad()
    return gradients_from(model, first_gradient_sites(sites, method, start_layers), batch_size)


def relevance_map(patch_relevance: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> tuple[np.ndarray, bool]:
    """(N,) patch relevance → (H, W) map: bilinear to the image size, then min-max (reference §2.1)."""
    image = patch_relevance.reshape(1, 1, *grid).float()  # (1, 1, gh, gw)
    upsampled = F.interpolate(image, size=size, mode="bilinear", align_corners=False).reshape(-1)  # (H·W,)
    scaled, degenerate = min_max(torch.nan_to_num(upsampled, nan=0.0), dim=0)
    return scaled.reshape(size).detach().cpu().numpy().astype(np.float32), bool(degenerate)


def stream_relevance(method: str, events: Sequence, start_layer: int) -> torch.Tensor:
    """`token_relevance` in float32, whatever precision the forward pass recorded in. (B, N, N).

    Layers below the first one a gradient method reads have no gradient (`gradients_from`) and are left out.
    """
    if NEEDS_GRADIENTS[method]:
        first = first_gradient_layer(method, max(event.layer for event in events), start_layer)
        events = [event for event in events if event.layer >= first]
    in_float32 = [dataclasses.replace(event, probs=event.probs.float(),
                                      grad=None if event.grad is None else event.grad.float()) for event in events]
    return token_relevance(method, in_float32, start_layer)


def check_start_layer(start_layer: int, sites: Sequence, stream: str) -> None:
    depth = 1 + max(site.layer for site in sites if site.stream == stream)
    if not 0 <= start_layer < depth:
        raise UsageError(f"--start-layer must be in 0..{depth - 1} for the {stream} tower, got {start_layer}")


def check_method(method: str) -> None:
    if method not in METHODS:
        raise UsageError(f"unknown method {method!r} (one of {', '.join(METHODS)})")


def backward(score: torch.Tensor, retain: bool) -> None:
    if score.requires_grad:
        score.backward(retain_graph=retain)


class ClassifierRelevancy:
    """Maps of a ViT classifier's decision: one per requested (or predicted) class."""

    def __init__(self, adapter, *, method: str = "chefer", targets: Sequence[str] = (), start_layer: int | None = None,
                 precision: str = "fp32"):
        check_method(method)
        autocast(str(adapter.device), precision)  # an unusable precision is a usage error, before any image
        self.adapter, self.method, self.precision = adapter, method, precision
        self.model_name = adapter.name
        self.fixed_targets = [adapter.target_index(t) for t in targets]
        self.start_layer = adapter.default_start_layer if start_layer is None else start_layer
        check_start_layer(self.start_layer, adapter.attention_sites(), "vision")

    def meta(self) -> dict[str, Any]:
        return {"start_layer": self.start_layer, "precision": self.precision}

    def _targets(self, logits: torch.Tensor) -> list[list[int]]:
        if self.fixed_targets:
            return [self.fixed_targets] * logits.shape[0]
        if self.adapter.multi_label:
            chosen = [torch.nonzero(row > 0).flatten().tolist() for row in logits]
            return [c or [int(row.argmax())] for c, row in zip(chosen, logits)]
        return [[int(row.argmax())] for row in logits]

    def explain(self, images: Sequence[Image.Image]) -> list[list[TargetMap]]:
        adapter = self.adapter
        pixels = adapter.preprocess(images, adapter.native_size)
        needs_gradients = NEEDS_GRADIENTS[self.method]
        results: list[list[TargetMap]] = [[] for _ in images]
        sites = adapter.attention_sites()
        with method_gradients(self.method, adapter.model, sites, {"vision": self.start_layer}), \
                AttentionRecorder(sites) as recording:
            with autocast(str(adapter.device), self.precision):
                logits = adapter.classify(pixels).float()  # (B, C)
            if not torch.isfinite(logits).all():
                raise ItemError("NonFiniteOutput", "the model produced non-finite logits")
            targets = self._targets(logits.detach())
            probabilities = logits.detach().sigmoid() if adapter.multi_label else logits.detach().softmax(-1)
            slots = max(len(t) for t in targets)
            for slot in range(slots):
                chosen = [(i, t[slot]) for i, t in enumerate(targets) if slot < len(t)]
                if needs_gradients:
                    score = sum(logits[i, c] for i, c in chosen)  # samples are independent in eval mode
                    backward(score, retain=slot < slots - 1)
                relevance = stream_relevance(self.method, recording.select(stream="vision"), self.start_layer)
                for i, c in chosen:
                    patches = relevance[i, 0, adapter.prefix_tokens:]  # CLS row, prefix columns dropped
                    heat, degenerate = relevance_map(patches, adapter.grid(), (images[i].height, images[i].width))
                    extra = {"label": adapter.labels[c], "index": c,
                             "probability": round(float(probabilities[i, c]), 6),
                             "predicted": adapter.labels[int(logits[i].argmax())]}
                    results[i].append(TargetMap(adapter.labels[c], float(logits[i, c].detach()), heat, degenerate, extra))
        return results


class ClipRelevancy:
    """Maps of CLIP's image–text similarity: image relevance from the vision tower, token relevance
    from the text tower's end-of-text row (reference §2.2)."""

    def __init__(self, adapter, texts: Sequence[str], *, method: str = "chefer", start_layer: int | None = None,
                 precision: str = "fp32"):
        check_method(method)
        autocast(str(adapter.device), precision)
        self.precision = precision
        texts = [text.strip() for text in texts]
        if not texts or not all(texts):
            raise UsageError("--text must be given at least once and must not be empty")
        self.adapter, self.texts, self.method = adapter, texts, method
        self.model_name = adapter.name
        self.sites = adapter.attention_sites()
        last = {stream: max(s.layer for s in self.sites if s.stream == stream) for stream in ("vision", "text")}
        if start_layer is not None:
            check_start_layer(start_layer, self.sites, "vision")
        # one --start-layer serves both towers; the text tower (often shallower) starts at its last layer at most
        self.start_layers = {stream: depth if start_layer is None else min(start_layer, depth)
                             for stream, depth in last.items()}

    def meta(self) -> dict[str, Any]:
        return {"start_layer": self.start_layers["vision"], "precision": self.precision}

    def _encode_text(self, text: str, batch_size: int, recording) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(B or 1, E) normalised embedding and the tokens. The tower runs once for the text; gradient methods
        widen it to the batch at their start block, and where a tower cannot be widened it runs again on B
        copies of the text."""
        recording.drop("text")
        tokens = self.adapter.tokenize([text])  # (1, L)
        with autocast(str(self.adapter.device), self.precision):
            embedding = self.adapter.encode_tokens(tokens)
        if NEEDS_GRADIENTS[self.method] and embedding.shape[0] != batch_size:
            recording.drop("text")
            tokens = self.adapter.tokenize([text] * batch_size)  # (B, L)
            with autocast(str(self.adapter.device), self.precision):
                embedding = self.adapter.encode_tokens(tokens)
        return F.normalize(embedding.float(), dim=-1), tokens

    def explain(self, images: Sequence[Image.Image]) -> list[list[TargetMap]]:
        adapter = self.adapter
        pixels = adapter.preprocess(images, adapter.native_size)
        needs_gradients = NEEDS_GRADIENTS[self.method]
        grid = adapter.grid(adapter.native_size)
        results: list[list[TargetMap]] = [[] for _ in images]
        with method_gradients(self.method, adapter.model, self.sites, self.start_layers, len(images)), \
                AttentionRecorder(self.sites) as recording:
            with autocast(str(adapter.device), self.precision):
                image_embedding = adapter.encode_image(pixels)
            image_embedding = F.normalize(image_embedding.float(), dim=-1)  # (B, E)
            for k, text in enumerate(self.texts):
                text_embedding, tokens = self._encode_text(text, len(images), recording)
                similarity = (image_embedding * text_embedding).sum(dim=-1)  # (B,)
                if not torch.isfinite(similarity).all():
                    raise ItemError("NonFiniteOutput", "the model produced non-finite embeddings")
                if needs_gradients:
                    backward(adapter.logit_scale * similarity.sum(), retain=k < len(self.texts) - 1)
                image_relevance = stream_relevance(self.method, recording.select(stream="vision"),
                                                   self.start_layers["vision"])
                text_relevance = stream_relevance(self.method, recording.select(stream="text"),
                                                  self.start_layers["text"])
                text_relevance = text_relevance.expand(len(images), -1, -1)  # (B, L, L); gradient-free: one text pass
                end = int(adapter.pooled_index(tokens)[0])
                words = adapter.token_words(tokens, 0)
                for i, image in enumerate(images):
                    heat, degenerate = relevance_map(image_relevance[i, 0, 1:], grid, (image.height, image.width))
                    row = text_relevance[i, end, 1:end]  # the pooled row, start and end tokens dropped
                    entries = token_relevances(words[1:end], row.tolist())
                    results[i].append(TargetMap(text, float(similarity[i].detach()), heat, degenerate, {"tokens": entries}))
        return results


FAMILY_OPTIONS = {  # option → (what it is for, the families that take it)
    "--text": ("CLIP models", {"clip"}),
    "--target": ("classifiers", {"vit"}),
    "--start-layer": ("ViT and CLIP models", {"vit", "clip"}),
    "--precision": ("ViT and CLIP models (the others run in fp32)", {"vit", "clip"}),
    "--question": ("VQA models (LXMERT, VisualBERT)", {"lxmert", "visualbert"}),
    "--answer": ("VQA models (LXMERT, VisualBERT)", {"lxmert", "visualbert"}),
    "--features": ("region-feature models (LXMERT, VisualBERT)", {"lxmert", "visualbert"}),
    "--threshold": ("detection models (DETR)", {"detr"}),
}
FAMILIES = ("clip", "vit", "lxmert", "visualbert", "detr")


def check_options(adapter, given: dict[str, bool]) -> None:
    """Usage errors for options given to a family that does not take them (each explainer checks its methods)."""
    family = getattr(adapter, "family", "")
    if family not in FAMILIES:
        raise UsageError(f"{adapter.name} ({family}) has no relevancy support yet")
    for option, (purpose, families) in FAMILY_OPTIONS.items():
        if given.get(option) and family not in families:
            takes = [name for name, (_, fs) in FAMILY_OPTIONS.items() if family in fs]
            raise UsageError(f"{option} is for {purpose}; {adapter.name} ({family}) takes {', '.join(takes)}")


def build_relevancy(adapter, *, method: str, texts: Sequence[str] = (), targets: Sequence[str] = (),
                    start_layer: int | None = None, precision: str = "fp32", questions: Sequence[str] = (),
                    answer: str | None = None, features: str | Path | None = None, threshold: float | None = None):
    """The relevancy explainer for an adapter's family; usage errors for options that do not apply.

    `features` (a .npz file, see `models.regions`) replaces a region model's own region extractor;
    `threshold` defaults to `DEFAULT_THRESHOLD`.
    """
    given = {"--text": bool(texts), "--target": bool(targets), "--start-layer": start_layer is not None,
             "--precision": precision != "fp32", "--question": bool(questions), "--answer": answer is not None,
             "--features": features is not None, "--threshold": threshold is not None}
    check_options(adapter, given)
    family = adapter.family
    if family == "clip":
        if not texts:
            raise UsageError(f"{adapter.name} is a CLIP model: give one or more --text")
        return ClipRelevancy(adapter, texts, method=method, start_layer=start_layer, precision=precision)
    if family == "vit":
        return ClassifierRelevancy(adapter, method=method, targets=targets, start_layer=start_layer,
                                   precision=precision)
    from xattn_cli.explainers.multimodal import DEFAULT_THRESHOLD, DetectionRelevancy, VqaRelevancy
    from xattn_cli.models.regions import NpzRegions

    if family == "detr":
        return DetectionRelevancy(adapter, threshold=DEFAULT_THRESHOLD if threshold is None else threshold,
                                  method=method)
    regions = None if features is None else NpzRegions(features)
    return VqaRelevancy(adapter, questions, answer=answer, regions=regions, method=method)
