"""Hugging Face `DetrForObjectDetection` as an adapter: detections and their attention sites.

DETR's attention modules call the transformers attention function, so the recorder's "hf" backend records
encoder self-, decoder self- and decoder→encoder cross-attention.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from xattn_cli.capture import AttentionSite
from xattn_cli.models.base import Adapter
from xattn_cli.models.layout import LAYOUTS


class DetrAdapter(Adapter):
    family = "detr"
    layout = LAYOUTS["detr"]
    mean: Sequence[float] = (0.485, 0.456, 0.406)
    std: Sequence[float] = (0.229, 0.224, 0.225)

    def __init__(self, model: torch.nn.Module, name: str = "hf-detr", size: tuple[int, int] = (224, 224)):
        super().__init__(model)
        self.name = name
        self.native_size = size
        config = model.config
        names = {int(k): v for k, v in config.id2label.items()}
        self.labels = [names.get(k, f"class {k}") for k in range(config.num_labels)]

    def detect(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class logits (B, queries, classes + 1; the last is "no object") and boxes (B, queries, 4) as
        normalised (cx, cy, w, h).

        The decoder's initial queries (zeros, as DETR uses them) are passed in explicitly, following the
        input's `requires_grad`: otherwise layer 0's decoder self-attention depends on parameters alone and,
        with parameters frozen, would get no gradient.
        """
        config = self.model.config
        pixels = pixels.to(next(self.model.parameters()).dtype)
        queries = torch.zeros(pixels.shape[0], config.num_queries, config.d_model, dtype=pixels.dtype,
                              device=pixels.device, requires_grad=pixels.requires_grad)  # (B, Q, D)
        output = self.model(pixel_values=pixels, decoder_inputs_embeds=queries)
        return output.logits, output.pred_boxes

    def attention_sites(self) -> list[AttentionSite]:
        detr = self.model.model
        sites = [AttentionSite(layer.self_attn, "self", "encoder", i, "hf") for i, layer in enumerate(detr.encoder.layers)]
        for i, layer in enumerate(detr.decoder.layers):
            sites += [AttentionSite(layer.self_attn, "self", "decoder", i, "hf"),
                      AttentionSite(layer.encoder_attn, "cross", "decoder->encoder", i, "hf")]
        return sites


def feature_grid(pixel_size: tuple[int, int], tokens: int) -> tuple[int, int]:
    """The (h, w) backbone feature map behind `tokens` image tokens of an input of `pixel_size` (H, W)."""
    height, width = pixel_size
    stride = round(math.sqrt(height * width / tokens))
    for step in (stride, stride // 2, stride * 2):
        grid = (math.ceil(height / step), math.ceil(width / step))
        if step and grid[0] * grid[1] == tokens:
            return grid
    raise ValueError(f"cannot lay {tokens} image tokens out on a grid for a {height}×{width} input")


def boxes_to_pixels(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Normalised (cx, cy, w, h) → (x0, y0, x1, y1) in pixels of an image of `size` (H, W). (..., 4)."""
    height, width = size
    cx, cy, w, h = boxes.unbind(-1)
    corners = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)  # (..., 4)
    return corners * torch.tensor([width, height, width, height], dtype=boxes.dtype, device=boxes.device)
