"""Why DETR detects what it detects: encoder-decoder relevancy (Chefer et al., ICCV 2021, reference §2.5),
one map per detection over the encoder's image tokens."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from PIL import Image

from xattn_cli.errors import UsageError
from xattn_cli.explainers.base import Explainer, check_finite
from xattn_cli.methods.coattention import encoder_decoder_relevance, last_layer_baseline
from xattn_cli.methods import RESIDUAL_RULES
from xattn_cli.models.detr import boxes_to_pixels
from xattn_cli.results import TargetMap

DEFAULT_THRESHOLD = 0.5
"""A query is a detection when its most probable class exceeds this probability."""


class DetectionRelevancy(Explainer):
    """One map per detection whose class probability exceeds `threshold`: the query's relevance over the
    encoder's image tokens, upsampled to the image. A threshold of 1 keeps none. `method` "raw" or
    "attn-gradcam" reads the query's row of the last decoder cross attention instead. `residual` is the
    rule for relevance rows that the residual normalisation divides 0 by 0 (`methods.relevancy.handle_residual`).
    `queries`, (query, class) pairs, explains those in every image, in that order, whatever their probability
    (the threshold is then unused): a benchmark explains the same detections on a perturbed or randomised model.
    """

    def __init__(self, adapter, *, threshold: float = DEFAULT_THRESHOLD, method: str = "chefer",
                 residual: str = "guarded", queries: Sequence[tuple[int, int]] | None = None):
        if adapter.layout.task != "detect":
            raise UsageError(f"{adapter.name} is not a detection model")
        if not 0.0 <= threshold <= 1.0:
            raise UsageError(f"threshold must be in [0, 1], got {threshold}")
        if residual not in RESIDUAL_RULES:
            raise UsageError(f"unknown residual rule {residual!r} (one of {', '.join(RESIDUAL_RULES)})")
        super().__init__(adapter, method)
        self.threshold, self.residual, self.queries = threshold, residual, queries

    def meta(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "residual": self.residual, **super().meta()}

    def detections(self, logits: torch.Tensor) -> list[list[tuple[int, int, float]]]:
        """Per image: (query, class, probability) above the threshold, most probable first."""
        probabilities = logits.softmax(dim=-1)[..., :-1]  # (B, Q, C): "no object" dropped
        best, classes = probabilities.max(dim=-1)  # (B, Q)
        found = []
        for row_best, row_classes in zip(best.tolist(), classes.tolist()):
            kept = [(q, c, p) for q, (p, c) in enumerate(zip(row_best, row_classes)) if p > self.threshold]
            found.append(sorted(kept, key=lambda d: -d[2]))
        return found

    def chosen(self, logits: torch.Tensor) -> list[list[tuple[int, int, float]]]:
        """Per image: the given (query, class) pairs and their probabilities."""
        probabilities = logits.softmax(dim=-1)  # (B, Q, C + 1)
        return [[(query, label, float(row[query, label])) for query, label in self.queries] for row in probabilities]

    def explain(self, images: Sequence[Image.Image], names: Sequence[str] = ()) -> list[list[TargetMap]]:
        """Images that resize to different sizes run as separate batches: a batch is padded to its largest
        image, and padding changes the backbone's features near the border, so an image's maps would
        otherwise depend on its batch neighbours."""
        results: list[list[TargetMap]] = [[] for _ in images]
        for indices in self.adapter.same_size_groups(images):
            for i, targets in zip(indices, self._explain_same_size([images[i] for i in indices])):
                results[i] = targets
        return results

    def _explain_same_size(self, images: Sequence[Image.Image]) -> list[list[TargetMap]]:
        adapter = self.adapter
        pixels = adapter.preprocess(images, adapter.native_size)
        results: list[list[TargetMap]] = [[] for _ in images]
        with self.recording() as recording:
            logits, boxes = adapter.detect(pixels.requires_grad_(self.spec.needs_gradients))  # (B, Q, C + 1), (B, Q, 4)
            check_finite(logits)
            found = self.detections(logits.detach()) if self.queries is None else self.chosen(logits.detach())
            slots = max((len(f) for f in found), default=0)
            for slot in range(slots):
                chosen = [(i, f[slot]) for i, f in enumerate(found) if slot < len(f)]
                self.backward(sum(logits[i, q, c] for i, (q, c, _) in chosen), retain=slot < slots - 1)
                relevance = self._query_relevance(recording)  # (B, Q, I)
                for i, (query, label, probability) in chosen:
                    image = images[i]
                    tokens, grid = adapter.image_tokens(pixels, i, relevance[i, query])  # the image's own cells
                    heat, degenerate = self.image_map(tokens, image, grid=grid)
                    box = boxes_to_pixels(boxes[i, query].detach().cpu(), (image.height, image.width)).tolist()
                    name = adapter.labels[label]
                    extra = {"label": name, "box": [round(c, 1) for c in box], "query": query,
                             "logit": round(float(logits[i, query, label].detach()), 6)}
                    results[i].append(TargetMap(f"{name}-{slot}", probability, heat, degenerate, extra))
        return results

    def _query_relevance(self, recording) -> torch.Tensor:
        """Each query's relevance over the encoder's image tokens. (B, Q, I)."""
        cross = recording.select("cross", "decoder->encoder")
        if self.method != "chefer":
            return last_layer_baseline(self.method, cross)
        return encoder_decoder_relevance(recording.select("self", "encoder"), recording.select("self", "decoder"),
                                         cross, residual=self.residual)
