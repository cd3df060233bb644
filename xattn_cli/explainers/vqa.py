"""Why a region-feature VQA model (LXMERT, VisualBERT, CATT) gives its answer: co-attention relevancy
(Chefer et al., ICCV 2021, reference §2.3–2.4) over the question's tokens and the image's regions, and for
causal attention (CATT) also over the dictionary entries its cross-sample attention reads."""
from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image

from xattn_cli.explainers.base import Explainer, check_finite, checked_texts
from xattn_cli.errors import UsageError
from xattn_cli.methods.causal import causal_last_layer, causal_relevance
from xattn_cli.methods.coattention import bimodal_relevance, last_layer_baseline, pooled_row
from xattn_cli.methods.relevancy import self_attention_relevance
from xattn_cli.models.regions import NpzRegions, Regions, RegionSource
from xattn_cli.results import TargetMap, token_relevances
from xattn_cli.tensors import min_max


def unit(values: torch.Tensor) -> torch.Tensor:
    """Min-max to [0, 1] (zeros when constant). (N,)."""
    scaled, _ = min_max(torch.nan_to_num(values.detach().float(), nan=0.0), dim=0)
    return scaled


class VqaRelevancy(Explainer):
    """Question-token relevance and image-region relevance (painted back onto the image), one target per
    question.

    Rule `bimodal` (LXMERT): the bi-modal rules, read from [CLS]. Rule `joint` (VisualBERT): the
    self-attention rules over the joint stream, read from the token its VQA head pools. Rule `causal` (CATT):
    the three-stream rules of `methods.causal`, read from [CLS]; each target also lists the top dictionary
    entries (`dictionary`) and the entries' share of the relevance (`dictionary_share`). `method` "raw" or
    "attn-gradcam" reads the same row off the last layer instead (LXMERT: the last text→vision cross
    attention for the regions, the last language self-attention for the words).
    Precomputed regions are looked up by the images' file stems (`names`).
    """

    def __init__(self, adapter, questions: Sequence[str], *, answer: str | None = None,
                 regions: RegionSource | None = None, method: str = "chefer"):
        if adapter.layout.task != "vqa":
            raise UsageError(f"{adapter.name} is not a region-feature VQA model")
        super().__init__(adapter, method)
        self.questions = checked_texts(questions, "question")
        self.fixed_answer = None if answer is None else adapter.target_index(answer)  # else each prediction
        self.regions = regions or adapter.regions
        if self.regions is None:
            raise UsageError(f"{adapter.name} needs region features: give a features .npz file")

    def meta(self) -> dict:
        """Rule `causal`: also the dictionary file the model ran with (absolute path) and its sha256, so a reader
        knows which dictionary ran and where its entries' member crops are."""
        dictionary = self.adapter.dictionary if self.adapter.layout.rule == "causal" else None
        if dictionary is None or dictionary.path is None:
            return super().meta()
        return {**super().meta(), "dictionary": dictionary.path, "dictionary_sha256": dictionary.sha256}

    def relevance(self, batch: dict[str, torch.Tensor], regions: Regions
                  ) -> tuple[torch.Tensor, list[int], torch.Tensor, torch.Tensor]:
        """Logits (B, answers), the explained answer per sample, and the relevance rows of the token the
        answer is read from: over the question's token positions (B, T) and over the regions (B, R)."""
        return self.relevance_rows(batch, regions)[:4]

    def relevance_rows(self, batch: dict[str, torch.Tensor], regions: Regions
                       ) -> tuple[torch.Tensor, list[int], torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """`relevance`, and the rows over the dictionary entries (B, K) for rule `causal` (else None)."""
        visual = Regions(regions.features.clone().requires_grad_(True), regions.boxes, regions.mask, regions.grid)
        with self.recording() as recording:
            logits = self.adapter.answer_logits(batch, visual)  # (B, answers)
            check_finite(logits)
            chosen = ([self.fixed_answer] * len(logits) if self.fixed_answer is not None
                      else [int(row.argmax()) for row in logits.detach()])
            self.backward(sum(logits[i, a] for i, a in enumerate(chosen)), retain=False)
        text_rows, region_rows, entry_rows = self._rows(recording, batch, regions.mask)
        return logits.detach(), chosen, text_rows, region_rows, entry_rows

    def _rows(self, recording, batch: dict[str, torch.Tensor], region_mask: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The explained token's relevance rows over the question's tokens (B, T), the regions (B, R) and,
        for rule `causal`, the dictionary entries (B, K; else None)."""
        chefer = self.method == "chefer"
        text_mask = batch["attention_mask"]  # (B, T)
        if self.adapter.layout.rule == "causal":
            streams = (recording.select("self", "text"), recording.select("self", "vision"),
                       recording.select("cross", "text->vision"), recording.select("cross", "vision->dictionary"))
            rows = (causal_relevance(*streams) if chefer
                    else causal_last_layer(self.method, *streams, text_mask, region_mask))
            return rows.tokens, rows.regions, rows.entries
        if self.adapter.layout.rule == "bimodal":
            text_self, text_to_vision = recording.select("self", "text"), recording.select("cross", "text->vision")
            if chefer:
                r_tt, r_ti = bimodal_relevance(text_self, recording.select("self", "vision"), text_to_vision,
                                               recording.select("cross", "vision->text"))
            else:
                r_tt = last_layer_baseline(self.method, text_self, text_mask, text_mask)  # (B, T, T)
                r_ti = last_layer_baseline(self.method, text_to_vision, text_mask, region_mask)  # (B, T, R)
            text_rows = r_tt[:, 0].clone()  # (B, T): the [CLS] row
            text_rows[:, 0] = 0  # [CLS] does not explain itself
            return text_rows, r_ti[:, 0], None
        joint = recording.select("self", "joint")
        joint_mask = torch.cat([text_mask, region_mask.to(text_mask.dtype)], dim=1)  # (B, T + R)
        relevance = (self_attention_relevance(joint) if chefer
                     else last_layer_baseline(self.method, joint, joint_mask, joint_mask))  # (B, T + R, T + R)
        rows = pooled_row(relevance, self.adapter.pooled_index(batch))  # (B, T + R)
        text_length = batch["input_ids"].shape[1]
        return rows[:, :text_length], rows[:, text_length:], None

    def explain(self, images: Sequence[Image.Image], names: Sequence[str] = ()) -> list[list[TargetMap]]:
        if not names and isinstance(self.regions, NpzRegions):
            raise ValueError("precomputed regions are looked up by file name: pass names= (the images' paths)")
        names = list(names) or [f"image{i}" for i in range(len(images))]
        regions = self.regions(images, names).to(self.adapter.device)
        results: list[list[TargetMap]] = [[] for _ in images]
        for question in self.questions:
            batch = self.adapter.tokenize([question] * len(images))
            logits, chosen, text_rows, region_rows, entry_rows = self.relevance_rows(batch, regions)
            for i, image in enumerate(images):
                target = self._target(question, i, image, batch, regions, logits, chosen[i], text_rows[i],
                                      region_rows[i])
                if entry_rows is not None:
                    target.extra.update(self._dictionary(region_rows[i][regions.mask[i] > 0], entry_rows[i]))
                results[i].append(target)
        return results

    def _target(self, question, i, image, batch, regions: Regions, logits, answer, text_row, region_row):
        adapter = self.adapter
        words = adapter.question_words(batch, i)
        tokens = token_relevances(adapter.token_words(batch, i)[words], text_row[words].tolist())
        if adapter.layout.rule == "joint":  # the row is the pooled token's own: it does not rate itself
            tokens[int(adapter.pooled_index(batch)[i]) - words.start]["pooled"] = True
        real = regions.mask[i] > 0
        where = {"grid": regions.grid} if regions.grid is not None else {"boxes": regions.boxes[i][real]}
        heat, degenerate = self.image_map(region_row[real], image, **where)
        scale = torch.tensor([image.width, image.height] * 2, dtype=regions.boxes.dtype)
        boxes = (regions.boxes[i][real].cpu() * scale).tolist()
        region_json = [{"box": [round(c, 1) for c in box], "relevance": round(float(r), 6)}
                       for box, r in zip(boxes, unit(region_row[real]))]
        extra = {"question": question, "answer": adapter.answers[answer], "index": answer,
                 "predicted": adapter.answers[int(logits[i].argmax())], "tokens": tokens, "regions": region_json}
        return TargetMap(question, float(logits[i, answer]), heat, degenerate, extra)

    def _dictionary(self, region_row: torch.Tensor, entry_row: torch.Tensor) -> dict:
        """The top dictionary entries (relevance as computed, not rescaled) and the entries' share of the
        relevance given to regions and entries together."""
        to_entries, total = float(entry_row.sum()), float(region_row.sum() + entry_row.sum())
        return {"dictionary": self.adapter.dictionary_entries(entry_row),
                "dictionary_share": float(f"{to_entries / total:.6g}") if total > 0 else 0.0}
