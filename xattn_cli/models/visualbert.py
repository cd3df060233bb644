"""Hugging Face `VisualBertForQuestionAnswering` as a region-VQA adapter.

One BERT stream over [text tokens, visual tokens]. `VisualBertSelfAttention` does not go through the
transformers attention-function registry; it always materialises its probabilities and passes them through
`dropout` on the way to V, so the recorder hooks that. The VQA head pools the token at
`attention_mask.sum(1) - 2` (the second-to-last text token), not [CLS].
"""
from __future__ import annotations

import torch

from xattn_cli.capture import AttentionSite
from xattn_cli.models.layout import LAYOUTS
from xattn_cli.models.regions import Regions, RegionSource, RegionVqaAdapter, answer_labels


class VisualBertAdapter(RegionVqaAdapter):
    family = "visualbert"
    layout = LAYOUTS["visualbert"]

    def __init__(self, model: torch.nn.Module, tokenizer, regions: RegionSource | None = None,
                 name: str = "hf-visualbert"):
        super().__init__(model, tokenizer, regions)
        self.name = name
        self.answers = answer_labels(model.config)

    def answer_logits(self, batch: dict[str, torch.Tensor], regions: Regions) -> torch.Tensor:
        visual_types = torch.ones(regions.mask.shape, dtype=torch.long, device=regions.mask.device)
        output = self.model(**batch, visual_embeds=regions.features, visual_attention_mask=regions.mask,
                            visual_token_type_ids=visual_types)
        return output.logits  # (B, answers)

    @staticmethod
    def pooled_index(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The token the VQA head reads, per sample. (B,)."""
        return batch["attention_mask"].sum(dim=1) - 2

    def attention_sites(self) -> list[AttentionSite]:
        layers = self.model.visual_bert.encoder.layer
        return [AttentionSite(layer.attention.self, "self", "joint", i, "dropout", "dropout")
                for i, layer in enumerate(layers)]
