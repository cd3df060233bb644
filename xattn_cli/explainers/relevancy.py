"""Relevancy maps (Chefer et al. and baselines) of self-attention models: ViT classifiers and CLIP
image–text pairs (reference/chefer-relevancy.md §2.1–2.2)."""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from xattn_cli.capture import AttentionEvent, AttentionSite
from xattn_cli.capture.gradients import first_layer_read
from xattn_cli.errors import UsageError
from xattn_cli.explainers.base import Explainer, check_finite, checked_texts
from xattn_cli.methods import MethodSpec
from xattn_cli.methods.relevancy import token_relevance
from xattn_cli.results import TargetMap, token_relevances


def stream_relevance(spec: MethodSpec, events: Sequence[AttentionEvent], start_layer: int) -> torch.Tensor:
    """`token_relevance` in float32, whatever precision the forward pass recorded in. (B, N, N).

    Layers below the first one a gradient method reads have no gradient (`gradients_from`) and are left out.
    """
    if spec.needs_gradients:
        first = first_layer_read(spec.last_layer_only, max(event.layer for event in events), start_layer)
        events = [event for event in events if event.layer >= first]
    in_float32 = [dataclasses.replace(event, probs=event.probs.float(),
                                      grad=None if event.grad is None else event.grad.float()) for event in events]
    return token_relevance(spec.name, in_float32, start_layer)


def check_start_layer(start_layer: int, sites: Sequence[AttentionSite], stream: str) -> None:
    depth = 1 + max(site.layer for site in sites if site.stream == stream)
    if not 0 <= start_layer < depth:
        raise UsageError(f"start layer must be in 0..{depth - 1} for the {stream} tower, got {start_layer}")


class ClassifierRelevancy(Explainer):
    """Maps of a ViT classifier's decision: one per requested (or predicted) class."""

    def __init__(self, adapter, *, method: str = "chefer", targets: Sequence[str] = (), start_layer: int | None = None,
                 precision: str = "fp32"):
        super().__init__(adapter, method, precision)
        self.fixed_targets = [adapter.target_index(t) for t in targets]
        self.start_layer = adapter.default_start_layer if start_layer is None else start_layer
        check_start_layer(self.start_layer, adapter.attention_sites(), "vision")

    def meta(self) -> dict[str, Any]:
        return {"start_layer": self.start_layer, **super().meta()}

    def _targets(self, logits: torch.Tensor) -> list[list[int]]:
        if self.fixed_targets:
            return [self.fixed_targets] * logits.shape[0]
        if self.adapter.multi_label:
            chosen = [torch.nonzero(row > 0).flatten().tolist() for row in logits]
            return [c or [int(row.argmax())] for c, row in zip(chosen, logits)]
        return [[int(row.argmax())] for row in logits]

    def explain(self, images: Sequence[Image.Image], names: Sequence[str] = ()) -> list[list[TargetMap]]:
        adapter = self.adapter
        pixels = adapter.preprocess(images, adapter.native_size)
        prefix, grid = adapter.layout.prefix_tokens, adapter.grid()
        results: list[list[TargetMap]] = [[] for _ in images]
        with self.recording({"vision": self.start_layer}) as recording:
            with self.autocast():
                logits = adapter.classify(pixels).float()  # (B, C)
            check_finite(logits)
            targets = self._targets(logits.detach())
            probabilities = logits.detach().sigmoid() if adapter.multi_label else logits.detach().softmax(-1)
            slots = max(len(t) for t in targets)
            for slot in range(slots):
                chosen = [(i, t[slot]) for i, t in enumerate(targets) if slot < len(t)]
                score = sum(logits[i, c] for i, c in chosen)  # samples are independent in eval mode
                self.backward(score, retain=slot < slots - 1)
                relevance = stream_relevance(self.spec, recording.select(stream="vision"), self.start_layer)
                for i, c in chosen:
                    heat, degenerate = self.image_map(relevance[i, 0, prefix:], images[i], grid=grid)  # CLS row
                    extra = {"label": adapter.labels[c], "index": c,
                             "probability": round(float(probabilities[i, c]), 6),
                             "predicted": adapter.labels[int(logits[i].argmax())]}
                    results[i].append(TargetMap(adapter.labels[c], float(logits[i, c].detach()), heat, degenerate, extra))
        return results


class ClipRelevancy(Explainer):
    """Maps of CLIP's image–text similarity: image relevance from the vision tower, token relevance
    from the text tower's end-of-text row (reference §2.2)."""

    def __init__(self, adapter, texts: Sequence[str], *, method: str = "chefer", start_layer: int | None = None,
                 precision: str = "fp32"):
        super().__init__(adapter, method, precision)
        self.texts = checked_texts(texts)
        sites = adapter.attention_sites()
        last = {stream: max(s.layer for s in sites if s.stream == stream) for stream in ("vision", "text")}
        if start_layer is not None:
            check_start_layer(start_layer, sites, "vision")
        # one start layer serves both towers; the text tower (often shallower) starts at its last layer at most
        self.start_layers = {stream: depth if start_layer is None else min(start_layer, depth)
                             for stream, depth in last.items()}

    def meta(self) -> dict[str, Any]:
        return {"start_layer": self.start_layers["vision"], **super().meta()}

    def _encode_text(self, text: str, batch_size: int, recording) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(B or 1, E) normalised embedding and the tokens. The tower runs once for the text; gradient methods
        widen it to the batch at their start block, and where a tower cannot be widened it runs again on B
        copies of the text."""
        recording.drop("text")
        tokens = self.adapter.tokenize([text])  # (1, L)
        with self.autocast():
            embedding = self.adapter.encode_tokens(tokens)
        if self.spec.needs_gradients and embedding.shape[0] != batch_size:
            recording.drop("text")
            tokens = self.adapter.tokenize([text] * batch_size)  # (B, L)
            with self.autocast():
                embedding = self.adapter.encode_tokens(tokens)
        return F.normalize(embedding.float(), dim=-1), tokens

    def explain(self, images: Sequence[Image.Image], names: Sequence[str] = ()) -> list[list[TargetMap]]:
        adapter = self.adapter
        pixels = adapter.preprocess(images, adapter.native_size)
        prefix, grid = adapter.layout.prefix_tokens, adapter.grid(adapter.native_size)
        results: list[list[TargetMap]] = [[] for _ in images]
        with self.recording(self.start_layers, len(images)) as recording:
            with self.autocast():
                image_embedding = adapter.encode_image(pixels)
            image_embedding = F.normalize(image_embedding.float(), dim=-1)  # (B, E)
            for k, text in enumerate(self.texts):
                text_embedding, tokens = self._encode_text(text, len(images), recording)
                similarity = (image_embedding * text_embedding).sum(dim=-1)  # (B,)
                check_finite(similarity, "embeddings")
                self.backward(adapter.logit_scale * similarity.sum(), retain=k < len(self.texts) - 1)
                image_relevance = stream_relevance(self.spec, recording.select(stream="vision"),
                                                   self.start_layers["vision"])
                text_relevance = stream_relevance(self.spec, recording.select(stream="text"),
                                                  self.start_layers["text"])
                text_relevance = text_relevance.expand(len(images), -1, -1)  # (B, L, L); gradient-free: one text pass
                end = int(adapter.pooled_index(tokens)[0])
                words = adapter.token_words(tokens, 0)
                for i, image in enumerate(images):
                    heat, degenerate = self.image_map(image_relevance[i, 0, prefix:], image, grid=grid)
                    row = text_relevance[i, end, 1:end]  # the pooled row, start and end tokens dropped
                    entries = token_relevances(words[1:end], row.tolist())
                    results[i].append(TargetMap(text, float(similarity[i].detach()), heat, degenerate, {"tokens": entries}))
        return results
