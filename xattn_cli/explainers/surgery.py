"""CLIP Surgery over batches of images for a fixed list of texts."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from xattn_cli.errors import UsageError
from xattn_cli.explainers.base import autocast
from xattn_cli.io.images import ItemError
from xattn_cli.methods.surgery import feature_surgery, min_max, similarity_map, similarity_to_points
from xattn_cli.models.clip import ClipAdapter
from xattn_cli.results import TargetMap
from xattn_cli.text import ensemble_templates


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


class SurgeryExplainer:
    """Similarity maps of each image against each text (reference/clip-surgery.md).

    Several texts use the class-weighted feature surgery; a single text subtracts the redundant
    feature of the empty-class ensemble. Text embeddings are computed once, here (and with
    `text_cache`, read from and written to the on-disk cache of `xattn_cli.cache`).
    """

    method = "surgery"

    def __init__(self, adapter: ClipAdapter, texts: Sequence[str], *, ensemble: bool = True,
                 size: tuple[int, int] | None = None, blocks: int | None = None, points: int = 0,
                 precision: str = "fp32", text_cache: bool = True):
        texts = [text.strip() for text in texts]
        if not texts or any(not text for text in texts):
            raise UsageError("--text must be given at least once and must not be empty")
        self.adapter, self.texts, self.ensemble, self.points = adapter, texts, ensemble, points
        self.size = size or adapter.default_surgery_size or adapter.native_size
        grid = adapter.grid(self.size)
        if min(grid) < 1:
            raise UsageError(f"--size {self.size[1]}x{self.size[0]} is smaller than one patch")
        depth = adapter.surgery_depth
        if blocks is not None and depth is None:
            raise UsageError(f"surgery blocks do not apply to {adapter.name}: a ResNet's attention pool is its "
                             "only attention")
        if blocks is not None and depth is not None and not 1 <= blocks <= depth:
            raise UsageError(f"--blocks must be in 1..{depth} for {adapter.name}, got {blocks}")
        self.blocks = blocks
        autocast(str(adapter.device), precision)  # an unusable precision is a usage error, before any image
        self.precision = precision
        self.model_name = adapter.name
        self.text_features = adapter.text_embeddings(texts, ensemble, disk_cache=text_cache)  # (K, E)
        self.redundant = (adapter.text_embeddings([""], ensemble, disk_cache=text_cache)[0]
                          if len(texts) == 1 else None)  # (E,)

    def meta(self) -> dict[str, Any]:
        return {"templates": len(ensemble_templates()) if self.ensemble else 1,
                "input_size": [self.size[1], self.size[0]], "precision": self.precision}

    @torch.inference_mode()
    def explain(self, images: Sequence[Image.Image]) -> list[list[TargetMap]]:
        pixels = self.adapter.preprocess(images, self.size)  # (B, 3, H, W)
        device = str(self.adapter.device)
        with autocast(device, self.precision):
            tokens, embedding = self.adapter.surgery_and_embedding(pixels, self.blocks)  # (B, n, E), (B, E)
        tokens, embedding = tokens.float(), embedding.float()
        similarity = feature_surgery(tokens, self.text_features, self.redundant)  # (B, n, K)
        scores = F.normalize(embedding, dim=-1) @ self.text_features.T  # (B, K)
        probabilities = (self.adapter.logit_scale * scores).softmax(dim=-1)  # (B, K)
        _, degenerate = min_max(similarity[:, 1:], dim=1)  # (B, K)
        grid = self.adapter.grid(self.size)
        results = []
        for i, image in enumerate(images):
            if not (torch.isfinite(similarity[i]).all() and torch.isfinite(scores[i]).all()):
                raise ItemError("NonFiniteOutput", "the model produced non-finite features for this image")
            size = (image.height, image.width)
            maps = similarity_map(similarity[i : i + 1], grid, size)[0].cpu().numpy()  # (K, H, W)
            targets = []
            for k, text in enumerate(self.texts):
                extra: dict[str, Any] = {"probability": round(float(probabilities[i, k]), 6)}
                if self.points:
                    points, labels = similarity_to_points(similarity[i, 1:, k], grid, size)
                    positives = [p for p, label in zip(points, labels) if label == 1]
                    extra["points"] = positives[::-1][: self.points]  # highest first
                targets.append(TargetMap(text, float(scores[i, k]), maps[k].astype(np.float32),
                                         bool(degenerate[i, k]), extra))
            results.append(targets)
        return results
