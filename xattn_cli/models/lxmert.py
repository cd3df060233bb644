"""Hugging Face `LxmertForQuestionAnswering` as a region-VQA adapter.

LXMERT's attention modules always materialise their probabilities and pass them through `dropout` on the
way to V, so the recorder hooks that. One cross-attention module serves both directions of each
cross-modality layer (text→vision, then vision→text); HF's `output_attentions` returns only the first,
so both are recorded by call order.
"""
from __future__ import annotations

import torch

from xattn_cli.capture import AttentionSite
from xattn_cli.models.layout import LAYOUTS
from xattn_cli.models.regions import Regions, RegionSource, RegionVqaAdapter, answer_labels


class LxmertAdapter(RegionVqaAdapter):
    family = "lxmert"
    layout = LAYOUTS["lxmert"]

    def __init__(self, model: torch.nn.Module, tokenizer, regions: RegionSource | None = None, name: str = "hf-lxmert"):
        super().__init__(model, tokenizer, regions)
        self.name = name
        self.answers = answer_labels(model.config)

    def answer_logits(self, batch: dict[str, torch.Tensor], regions: Regions) -> torch.Tensor:
        output = self.model(**batch, visual_feats=regions.features, visual_pos=regions.boxes,
                            visual_attention_mask=regions.mask)
        return output.question_answering_score  # (B, answers)

    def attention_sites(self) -> list[AttentionSite]:
        encoder = self.model.lxmert.encoder
        language, relation = len(encoder.layer), len(encoder.r_layers)
        sites = [AttentionSite(layer.attention.self, "self", "text", i, "dropout", "dropout")
                 for i, layer in enumerate(encoder.layer)]
        sites += [AttentionSite(layer.attention.self, "self", "vision", i, "dropout", "dropout")
                  for i, layer in enumerate(encoder.r_layers)]
        for j, layer in enumerate(encoder.x_layers):
            cross = layer.visual_attention.att  # called twice per layer: text→vision, then vision→text
            sites += [AttentionSite(cross, "cross", "text->vision", j, "dropout", "dropout"),
                      AttentionSite(cross, "cross", "vision->text", j, "dropout", "dropout"),
                      AttentionSite(layer.lang_self_att.self, "self", "text", language + j, "dropout", "dropout"),
                      AttentionSite(layer.visn_self_att.self, "self", "vision", relation + j, "dropout", "dropout")]
        return sites
