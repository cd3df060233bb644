"""Hugging Face `DetrForObjectDetection` as an adapter: detections and their attention sites.

DETR's attention modules call the transformers attention function, so the recorder's "hf" backend records
encoder self-, decoder self- and decoder→encoder cross-attention.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from xattn_cli.capture import AttentionSite
from xattn_cli.models.base import Adapter, normalize
from xattn_cli.models.layout import LAYOUTS


@dataclass
class DetrInputs:
    """A batch as DETR's image processor makes it: each image resized with its aspect ratio kept, padded at the
    bottom and right to the batch's largest, and the mask of its own pixels."""

    pixels: torch.Tensor  # (B, 3, H, W) normalised, zeros on padding
    mask: torch.Tensor  # (B, H, W) 1 on image pixels, 0 on padding

    def requires_grad_(self, requires_grad: bool = True) -> "DetrInputs":
        self.pixels.requires_grad_(requires_grad)
        return self


def resized_size(height: int, width: int, shortest: int, longest: int | None) -> tuple[int, int]:
    """(H, W) after DETR's resize: the shorter side to `shortest`, unless the longer would then pass `longest`
    (transformers' `get_size_with_aspect_ratio`, integer rounding included)."""
    low, high = float(min(height, width)), float(max(height, width))
    raw = None
    if longest is not None and high / low * shortest > longest:
        raw = longest * low / high
        shortest = int(round(raw))
    if min(height, width) == shortest:
        return height, width
    scale = raw if raw is not None else shortest
    if width < height:
        return int(scale * height / width), shortest
    return shortest, int(scale * width / height)


class DetrAdapter(Adapter):
    family = "detr"
    layout = LAYOUTS["detr"]
    mean: Sequence[float] = (0.485, 0.456, 0.406)
    std: Sequence[float] = (0.229, 0.224, 0.225)

    def __init__(self, model: torch.nn.Module, name: str = "hf-detr", size: tuple[int, int] = (224, 224),
                 edges: tuple[int, int | None] | None = None):
        """`size` (H, W): every image is squashed to it (a processor config with "height" and "width"); `edges`
        (shortest, longest): the processor's aspect-keeping resize with padding and a pixel mask instead."""
        super().__init__(model)
        self.name = name
        self.native_size = size
        self.edges = edges
        config = model.config
        names = {int(k): v for k, v in config.id2label.items()}
        self.labels = [names.get(k, f"class {k}") for k in range(config.num_labels)]

    def same_size_groups(self, images: Sequence[Image.Image]) -> list[list[int]]:
        """Indices of the images that resize to the same size, in order: a batch of one group needs no padding."""
        if self.edges is None:
            return [list(range(len(images)))]
        groups: dict[tuple[int, int], list[int]] = {}
        for index, image in enumerate(images):
            groups.setdefault(resized_size(image.height, image.width, *self.edges), []).append(index)
        return list(groups.values())

    def preprocess(self, images: Sequence[Image.Image], size: tuple[int, int]) -> torch.Tensor | DetrInputs:
        """Squashed pixels (B, 3, H, W) when the adapter has no `edges`; else `DetrInputs` as transformers'
        `DetrImageProcessor` builds them (bilinear resize, padding, mask)."""
        if self.edges is None:
            return super().preprocess(images, size)
        resized = [np.array(image.convert("RGB").resize(resized_size(image.height, image.width, *self.edges)[::-1],
                                                          Image.BILINEAR)) for image in images]
        height, width = max(a.shape[0] for a in resized), max(a.shape[1] for a in resized)
        pixels = torch.zeros(len(images), 3, height, width)
        mask = torch.zeros(len(images), height, width, dtype=torch.long)
        for i, array in enumerate(resized):
            pixels[i, :, : array.shape[0], : array.shape[1]] = normalize(array[None], self.mean, self.std)[0]
            mask[i, : array.shape[0], : array.shape[1]] = 1
        return DetrInputs(pixels.to(self.device), mask.to(self.device))

    def image_tokens(self, inputs: torch.Tensor | DetrInputs, index: int,
                     relevance: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Image `index`'s part of a relevance row over the batch's encoder tokens (I,), and its (h, w) grid: the
        padded feature map cropped to the cells of the image's own pixels (as DETR's mask marks them)."""
        pixels = inputs.pixels if isinstance(inputs, DetrInputs) else inputs
        grid = feature_grid(tuple(pixels.shape[-2:]), relevance.shape[-1])
        if not isinstance(inputs, DetrInputs):
            return relevance, grid
        cells = torch.nn.functional.interpolate(inputs.mask[index][None, None].float(), size=grid)[0, 0].bool()  # (h, w)
        rows, cols = int(cells.any(dim=1).sum()), int(cells.any(dim=0).sum())
        return relevance.reshape(grid)[:rows, :cols].reshape(-1), (rows, cols)  # (h'·w',)

    def detect(self, pixels: torch.Tensor | DetrInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Class logits (B, queries, classes + 1; the last is "no object") and boxes (B, queries, 4) as
        normalised (cx, cy, w, h) of each image (DETR predicts them relative to the unpadded image).

        The decoder's initial queries (zeros, as DETR uses them) are passed in explicitly, following the
        input's `requires_grad`: otherwise layer 0's decoder self-attention depends on parameters alone and,
        with parameters frozen, would get no gradient.
        """
        config = self.model.config
        mask = pixels.mask if isinstance(pixels, DetrInputs) else None
        pixels = (pixels.pixels if isinstance(pixels, DetrInputs) else pixels).to(next(self.model.parameters()).dtype)
        queries = torch.zeros(pixels.shape[0], config.num_queries, config.d_model, dtype=pixels.dtype,
                              device=pixels.device, requires_grad=pixels.requires_grad)  # (B, Q, D)
        output = self.model(pixel_values=pixels, pixel_mask=mask, decoder_inputs_embeds=queries)
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
    stride = round(math.sqrt(height * width / tokens))  # rounding up the sides makes this a guess: try powers of 2
    for step in (stride, stride // 2, stride * 2, *(2 ** k for k in range(1, 7))):
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
