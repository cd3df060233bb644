"""CLIP Surgery over batches of images for a fixed list of texts."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from xattn_cli.errors import UsageError
from xattn_cli.explainers.base import Explainer, check_finite, checked_texts
from xattn_cli.methods.surgery import feature_surgery, similarity_to_points
from xattn_cli.models.clip import ClipAdapter
from xattn_cli.results import TargetMap
from xattn_cli.tensors import to_image
from xattn_cli.text import ensemble_templates


class SurgeryExplainer(Explainer):
    """Similarity maps of each image against each text (reference/clip-surgery.md).

    Several texts use the class-weighted feature surgery; a single text subtracts the redundant
    feature of the empty-class ensemble. Text embeddings are computed once, here (and with
    `text_cache`, read from and written to the on-disk cache of `xattn_cli.cache`).
    """

    def __init__(self, adapter: ClipAdapter, texts: Sequence[str], *, ensemble: bool = True,
                 size: tuple[int, int] | None = None, blocks: int | None = None, points: int = 0,
                 precision: str = "fp32", text_cache: bool = True):
        if "surgery" not in adapter.layout.explainers:
            raise UsageError(f"{adapter.name} has no surgery; use xattn relevancy")
        super().__init__(adapter, "surgery", precision)
        self.texts, self.ensemble, self.points = checked_texts(texts), ensemble, points
        self.size = size or adapter.default_surgery_size or adapter.native_size
        grid = adapter.grid(self.size)
        if min(grid) < 1:
            raise UsageError(f"input size {self.size[1]}x{self.size[0]} is smaller than one patch")
        depth = adapter.surgery_depth
        if blocks is not None and depth is None:
            raise UsageError(f"surgery blocks do not apply to {adapter.name}: a ResNet's attention pool is its "
                             "only attention")
        if blocks is not None and depth is not None and not 1 <= blocks <= depth:
            raise UsageError(f"surgery blocks must be in 1..{depth} for {adapter.name}, got {blocks}")
        self.blocks = blocks
        self.text_features = adapter.text_embeddings(texts, ensemble, disk_cache=text_cache)  # (K, E)
        self.redundant = (adapter.text_embeddings([""], ensemble, disk_cache=text_cache)[0]
                          if len(texts) == 1 else None)  # (E,)

    def meta(self) -> dict[str, Any]:
        return {"templates": len(ensemble_templates()) if self.ensemble else 1,
                "input_size": [self.size[1], self.size[0]], **super().meta()}

    @torch.inference_mode()
    def explain(self, images: Sequence[Image.Image], names: Sequence[str] = ()) -> list[list[TargetMap]]:
        pixels = self.adapter.preprocess(images, self.size)  # (B, 3, H, W)
        with self.autocast():
            tokens, embedding = self.adapter.surgery_and_embedding(pixels, self.blocks)  # (B, n, E), (B, E)
        tokens, embedding = tokens.float(), embedding.float()
        similarity = feature_surgery(tokens, self.text_features, self.redundant)  # (B, n, K)
        scores = F.normalize(embedding, dim=-1) @ self.text_features.T  # (B, K)
        probabilities = (self.adapter.logit_scale * scores).softmax(dim=-1)  # (B, K)
        grid = self.adapter.grid(self.size)
        results = []
        for i, image in enumerate(images):
            check_finite(similarity[i], "features for this image")
            check_finite(scores[i], "features for this image")
            size = (image.height, image.width)
            maps, degenerate = to_image(similarity[i, 1:].T, size, grid=grid, scale_first=True)  # (K, H, W), (K,)
            maps = maps.cpu().numpy()
            targets = []
            for k, text in enumerate(self.texts):
                extra: dict[str, Any] = {"probability": round(float(probabilities[i, k]), 6)}
                if self.points:
                    points, labels = similarity_to_points(similarity[i, 1:, k], grid, size)
                    positives = [p for p, label in zip(points, labels) if label == 1]
                    extra["points"] = positives[::-1][: self.points]  # highest first
                targets.append(TargetMap(text, float(scores[i, k]), maps[k].astype(np.float32),
                                         bool(degenerate[k]), extra))
            results.append(targets)
        return results
