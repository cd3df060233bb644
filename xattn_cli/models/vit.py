"""ViT image classifiers (Hugging Face and timm) as adapters for relevancy."""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from xattn_cli.capture import AttentionSite
from xattn_cli.models.base import Adapter
from xattn_cli.models.layout import LAYOUTS, Layout


class ViTClassifierAdapter(Adapter):
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

    @property
    def layout(self) -> Layout:
        return dataclasses.replace(LAYOUTS["vit"], prefix_tokens=self.prefix_tokens)

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


def build_vit(cfg: dict) -> torch.nn.Module:
    """A `ViTForImageClassification` from a config file's `hf_config` (JSON keys are strings)."""
    import transformers

    hf = dict(cfg["hf_config"])
    hf["id2label"] = {int(k): v for k, v in hf["id2label"].items()}
    hf["label2id"] = {v: k for k, v in hf["id2label"].items()}
    return transformers.ViTForImageClassification(transformers.ViTConfig(**hf))


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
