"""Relevancy for co-attention and encoder-decoder models (Chefer et al., ICCV 2021): region-feature VQA
(LXMERT, VisualBERT) and DETR detections. Maps come back as `TargetMap`s, like every other explainer."""
from __future__ import annotations

from typing import Any, ClassVar, Sequence

import numpy as np
import torch
from PIL import Image

from xattn_cli.capture import AttentionRecorder
from xattn_cli.errors import UsageError
from xattn_cli.explainers.relevancy import backward, input_gradients_only, relevance_map
from xattn_cli.io.images import ItemError
from xattn_cli.methods.coattention import (LAST_LAYER_BASELINES, bimodal_relevance, encoder_decoder_relevance,
                                           last_layer_baseline, pooled_row)
from xattn_cli.methods.relevancy import NEEDS_GRADIENTS, self_attention_relevance
from xattn_cli.methods.surgery import min_max
from xattn_cli.models.detr import boxes_to_pixels, feature_grid
from xattn_cli.models.regions import NpzRegions, Regions, RegionSource, regions_to_map
from xattn_cli.results import TargetMap, token_relevances

DEFAULT_THRESHOLD = 0.5
"""DETR: a query is a detection when its most probable class exceeds this probability."""


def _unit(values: torch.Tensor) -> torch.Tensor:
    """Min-max to [0, 1] (zeros when constant). (N,)."""
    scaled, _ = min_max(torch.nan_to_num(values.detach().float(), nan=0.0), dim=0)
    return scaled


METHODS = ("chefer", *LAST_LAYER_BASELINES)
"""What the co-attention and encoder-decoder explainers offer: the rules, and the last-layer baselines."""


def _check_method(method: str, adapter) -> None:
    if method not in METHODS:
        raise UsageError(f"{adapter.name} ({adapter.family}) supports --method {', '.join(METHODS)}, not {method!r}")


def _check_finite(scores: torch.Tensor) -> None:
    if not torch.isfinite(scores).all():
        raise ItemError("NonFiniteOutput", "the model produced non-finite logits")


class VqaRelevancy:
    """Why a region-feature VQA model gives its answer: question-token relevance and image-region relevance
    (painted back onto the image), one target per question.

    LXMERT: the bi-modal rules (reference §2.4), read from [CLS]. VisualBERT: the self-attention rules over
    the joint stream (§2.3), read from the token its VQA head pools. `method` "raw" or "attn-gradcam" reads
    the same row off the last layer instead (LXMERT: the last text→vision cross attention for the regions,
    the last language self-attention for the words).

    `explain` takes each image's path too (`takes_names`): precomputed regions are looked up by file stem.
    """

    takes_names: ClassVar[bool] = True

    def __init__(self, adapter, questions: Sequence[str], *, answer: str | None = None,
                 regions: RegionSource | None = None, method: str = "chefer"):
        questions = [q.strip() for q in questions]
        if not questions or not all(questions):
            raise UsageError("--question must be given at least once and must not be empty")
        if adapter.family not in ("lxmert", "visualbert"):
            raise UsageError(f"{adapter.name} ({adapter.family}) is not a region-feature VQA model")
        _check_method(method, adapter)
        self.adapter, self.questions, self.model_name, self.method = adapter, questions, adapter.name, method
        self.fixed_answer = None if answer is None else adapter.target_index(answer)  # else each prediction
        self.regions = regions or adapter.regions
        if self.regions is None:
            raise UsageError(f"{adapter.name} needs region features: give --features FILE.npz")

    def meta(self) -> dict[str, Any]:
        return {"precision": "fp32"}

    def relevance(self, batch: dict[str, torch.Tensor], regions: Regions
                  ) -> tuple[torch.Tensor, list[int], torch.Tensor, torch.Tensor]:
        """Logits (B, answers), the explained answer per sample, and the relevance rows of the token the
        answer is read from: over the question's token positions (B, T) and over the regions (B, R)."""
        adapter = self.adapter
        visual = Regions(regions.features.clone().requires_grad_(True), regions.boxes, regions.mask, regions.grid)
        with input_gradients_only(adapter.model), AttentionRecorder(adapter.attention_sites()) as recording:
            logits = adapter.answer_logits(batch, visual)  # (B, answers)
            _check_finite(logits)
            chosen = ([self.fixed_answer] * len(logits) if self.fixed_answer is not None
                      else [int(row.argmax()) for row in logits.detach()])
            if NEEDS_GRADIENTS[self.method]:
                backward(sum(logits[i, a] for i, a in enumerate(chosen)), retain=False)
        text_rows, region_rows = self._rows(recording, batch, regions.mask)
        return logits.detach(), chosen, text_rows, region_rows

    def _rows(self, recording, batch: dict[str, torch.Tensor], region_mask: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """The explained token's relevance rows over the question's tokens (B, T) and the regions (B, R)."""
        chefer = self.method == "chefer"
        text_mask = batch["attention_mask"]  # (B, T)
        if self.adapter.family == "lxmert":
            text_self, text_to_vision = recording.select("self", "text"), recording.select("cross", "text->vision")
            if chefer:
                r_tt, r_ti = bimodal_relevance(text_self, recording.select("self", "vision"), text_to_vision,
                                               recording.select("cross", "vision->text"))
            else:
                r_tt = last_layer_baseline(self.method, text_self, text_mask, text_mask)  # (B, T, T)
                r_ti = last_layer_baseline(self.method, text_to_vision, text_mask, region_mask)  # (B, T, R)
            text_rows = r_tt[:, 0].clone()  # (B, T): the [CLS] row
            text_rows[:, 0] = 0  # [CLS] does not explain itself
            return text_rows, r_ti[:, 0]
        joint = recording.select("self", "joint")
        joint_mask = torch.cat([text_mask, region_mask.to(text_mask.dtype)], dim=1)  # (B, T + R)
        relevance = (self_attention_relevance(joint) if chefer
                     else last_layer_baseline(self.method, joint, joint_mask, joint_mask))  # (B, T + R, T + R)
        rows = pooled_row(relevance, self.adapter.pooled_index(batch))  # (B, T + R)
        text_length = batch["input_ids"].shape[1]
        return rows[:, :text_length], rows[:, text_length:]

    def _words(self, batch: dict[str, torch.Tensor], i: int) -> slice:
        """The question's word tokens: between [CLS] and [SEP]. VisualBERT's head pools the last of them (the
        "?", or the last word of a question without one), which is listed too."""
        return slice(1, int(batch["attention_mask"][i].sum()) - 1)

    def explain(self, images: Sequence[Image.Image], names: Sequence[str] = ()) -> list[list[TargetMap]]:
        adapter = self.adapter
        if not names and isinstance(self.regions, NpzRegions):
            raise ValueError("precomputed regions are looked up by file name: pass names= (the images' paths)")
        names = list(names) or [f"image{i}" for i in range(len(images))]
        regions = self.regions(images, names).to(adapter.device)
        results: list[list[TargetMap]] = [[] for _ in images]
        for question in self.questions:
            batch = adapter.tokenize([question] * len(images))
            logits, chosen, text_rows, region_rows = self.relevance(batch, regions)
            for i, image in enumerate(images):
                results[i].append(self._target(question, i, image, batch, regions, logits, chosen[i],
                                               text_rows[i], region_rows[i]))
        return results

    def _target(self, question, i, image, batch, regions: Regions, logits, answer, text_row, region_row):
        adapter = self.adapter
        size = (image.height, image.width)
        words = self._words(batch, i)
        tokens = token_relevances(adapter.token_words(batch, i)[words], text_row[words].tolist())
        real = regions.mask[i] > 0
        if regions.grid is not None:
            heat, degenerate = relevance_map(region_row[real], regions.grid, size)
        else:
            painted = regions_to_map(region_row.detach(), regions, i, size).flatten()  # (H·W,)
            scaled, degenerate = min_max(torch.nan_to_num(painted.float(), nan=0.0), dim=0)
            heat, degenerate = scaled.reshape(size).cpu().numpy().astype(np.float32), bool(degenerate)
        scale = torch.tensor([image.width, image.height] * 2, dtype=regions.boxes.dtype)
        boxes = (regions.boxes[i][real].cpu() * scale).tolist()
        region_json = [{"box": [round(c, 1) for c in box], "relevance": round(float(r), 6)}
                       for box, r in zip(boxes, _unit(region_row[real]))]
        extra = {"question": question, "answer": adapter.answers[answer], "index": answer,
                 "predicted": adapter.answers[int(logits[i].argmax())], "tokens": tokens, "regions": region_json}
        return TargetMap(question, float(logits[i, answer]), heat, degenerate, extra)


class DetectionRelevancy:
    """One map per DETR detection whose class probability exceeds `threshold`: the query's relevance over
    the encoder's image tokens (reference §2.5), upsampled to the image. A threshold of 1 keeps none.
    `method` "raw" or "attn-gradcam" reads the query's row of the last decoder cross attention instead."""

    def __init__(self, adapter, *, threshold: float = DEFAULT_THRESHOLD, method: str = "chefer"):
        if adapter.family != "detr":
            raise UsageError(f"{adapter.name} ({adapter.family}) is not a detection model")
        if not 0.0 <= threshold <= 1.0:
            raise UsageError(f"--threshold must be in [0, 1], got {threshold}")
        _check_method(method, adapter)
        self.adapter, self.threshold, self.model_name, self.method = adapter, threshold, adapter.name, method

    def meta(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "precision": "fp32"}

    def detections(self, logits: torch.Tensor) -> list[list[tuple[int, int, float]]]:
        """Per image: (query, class, probability) above the threshold, most probable first."""
        probabilities = logits.softmax(dim=-1)[..., :-1]  # (B, Q, C): "no object" dropped
        best, classes = probabilities.max(dim=-1)  # (B, Q)
        found = []
        for row_best, row_classes in zip(best.tolist(), classes.tolist()):
            kept = [(q, c, p) for q, (p, c) in enumerate(zip(row_best, row_classes)) if p > self.threshold]
            found.append(sorted(kept, key=lambda d: -d[2]))
        return found

    def explain(self, images: Sequence[Image.Image]) -> list[list[TargetMap]]:
        adapter = self.adapter
        pixels = adapter.preprocess(images, adapter.native_size)
        results: list[list[TargetMap]] = [[] for _ in images]
        with input_gradients_only(adapter.model), AttentionRecorder(adapter.attention_sites()) as recording:
            logits, boxes = adapter.detect(pixels.requires_grad_(True))  # (B, Q, C + 1), (B, Q, 4)
            _check_finite(logits)
            found = self.detections(logits.detach())
            slots = max((len(f) for f in found), default=0)
            for slot in range(slots):
                chosen = [(i, f[slot]) for i, f in enumerate(found) if slot < len(f)]
                if NEEDS_GRADIENTS[self.method]:
                    backward(sum(logits[i, q, c] for i, (q, c, _) in chosen), retain=slot < slots - 1)
                relevance = self._query_relevance(recording)  # (B, Q, I)
                grid = feature_grid(adapter.native_size, relevance.shape[-1])
                for i, (query, label, probability) in chosen:
                    image = images[i]
                    heat, degenerate = relevance_map(relevance[i, query], grid, (image.height, image.width))
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
        return encoder_decoder_relevance(recording.select("self", "encoder"), recording.select("self", "decoder"), cross)
