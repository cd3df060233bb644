"""ViT image classifiers (Hugging Face and timm) as adapters for relevancy."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

from xattn_cli.capture import AttentionSite


class ViTClassifierAdapter:
    """What the relevancy explainer needs from a ViT classifier."""

    family = "vit"
    name: str
    native_size: tuple[int, int]
    patch_size: tuple[int, int]
    prefix_tokens: int = 1  # CLS (+ register tokens); the CLS token is row 0
    mean: Sequence[float] = (0.5, 0.5, 0.5)
    std: Sequence[float] = (0.5, 0.5, 0.5)
    labels: list[str]
    multi_label: bool = False
    default_start_layer: int = 0

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> "ViTClassifierAdapter":
        self.model.to(device)
        return self

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Squash to the native size (bicubic, no crop, so the map covers the whole image). (B, 3, H, W)."""
        height, width = self.native_size
        arrays = [np.asarray(image.convert("RGB").resize((width, height), Image.BICUBIC)) for image in images]
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0  # (B, 3, H, W)
        mean, std = torch.tensor(self.mean).view(1, 3, 1, 1), torch.tensor(self.std).view(1, 3, 1, 1)
        return ((pixels - mean) / std).to(self.device)

    def grid(self) -> tuple[int, int]:
        return self.native_size[0] // self.patch_size[0], self.native_size[1] // self.patch_size[1]

    def classify(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, classes) logits."""
        raise NotImplementedError

    def attention_sites(self) -> list[AttentionSite]:
        raise NotImplementedError

    def target_index(self, target: str) -> int:
        """A label name or an index."""
        from xattn_cli.errors import UsageError

        if target in self.labels:
            return self.labels.index(target)
        if target.isdigit() and int(target) < len(self.labels):
            return int(target)
        raise UsageError(f"unknown target {target!r}; this model's labels: {', '.join(self.labels[:20])}"
                         + (" ..." if len(self.labels) > 20 else ""))


def _hf_attention_module(layer: torch.nn.Module) -> torch.nn.Module:
    """The module of a HF encoder layer that calls the attention function (it owns `config`)."""
    found = [m for m in layer.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "config")
             and any(hasattr(m, name) for name in ("q_proj", "query"))]
    if not found:
        raise TypeError(f"no attention module found in {type(layer).__name__}")
    return found[-1]


class HFViTAdapter(ViTClassifierAdapter):
    """`transformers.ViTForImageClassification` (eager attention is switched on while recording)."""

    def __init__(self, model: torch.nn.Module, name: str = "hf-vit"):
        super().__init__(model)
        config = model.config
        self.name = name
        self.native_size = (config.image_size, config.image_size)
        self.patch_size = (config.patch_size, config.patch_size)
        self.labels = [config.id2label[i] for i in range(config.num_labels)]
        self.multi_label = config.problem_type == "multi_label_classification"

    def classify(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixels).logits

    def attention_sites(self) -> list[AttentionSite]:
        backbone = self.model.vit
        layers = backbone.layers if hasattr(backbone, "layers") else backbone.encoder.layer  # transformers ≥5 / <5
        return [AttentionSite(_hf_attention_module(layer), "self", "vision", i, "hf") for i, layer in enumerate(layers)]


class TimmViTAdapter(ViTClassifierAdapter):
    """A timm `VisionTransformer` (its fused attention is switched off while recording)."""

    def __init__(self, model: torch.nn.Module, name: str = "timm"):
        super().__init__(model)
        self.name = name
        cfg = model.pretrained_cfg or {}
        self.native_size = tuple(model.patch_embed.img_size)
        self.patch_size = tuple(model.patch_embed.patch_size)
        self.prefix_tokens = model.num_prefix_tokens
        self.mean, self.std = cfg.get("mean", self.mean), cfg.get("std", self.std)
        self.labels = list(cfg.get("label_names") or [f"class {i}" for i in range(model.num_classes)])

    def classify(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixels)

    def attention_sites(self) -> list[AttentionSite]:
        return [AttentionSite(block.attn, "self", "vision", i, "timm") for i, block in enumerate(self.model.blocks)]
