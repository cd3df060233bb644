"""Relevancy through causal attention (CATT; Yang et al., CVPR 2021): the question's relevance to the image's
regions, through in-sample attention (IS-ATT), and to the entries of a global dictionary, through
cross-sample attention (CS-ATT). Chefer, Gur, Wolf, ICCV 2021 co-attention rules 5-11, three streams.
See shared/reference/catt.md §3 and reference/chefer-relevancy.md §1.3-1.5.

The layout (shapes-catt; catt.md §3): a vision block of `CausalAttention`s with REGION queries, IS =
self-attention over the image's regions, CS = the same region tokens over the K dictionary entries, fused by
`combine`; question self-attention layers; then question→image fusion `CrossAttention`s; the answer read at
[CLS] (question token 0). Recorded as: question self-attention ("self", "text"), IS ("self", "vision"), CS
("cross", "vision->dictionary", the layer number of its block's IS), fusion ("cross", "text->vision").

Streams t (question), i (regions), d (dictionary entries). R^tt = R^ii = R^dd = I, every other R = 0. One
general rule: when stream s attends stream q with Ā (rule 5), R^sq += R̄^ssᵀ Ā R̄^qq (rule 10) and
R^sx += Ā R^qx for every other stream x (rule 11; s = q is the self-attention rule 6+7, R^sx += Ā R^sx for
all x). Decisions where the issue and the structure leave a choice, and what follows from the layout:
- Entries attend nothing and do not depend on the sample: R^dd = I stays, R̄^dd = I, R^dt = R^di = 0.
  Regions never attend the question: R^it = 0. Every rule-11 term through these is zero and is not computed
  (the vision block's CS adds Ā_cs R^di = 0 to R^ii; the fusion adds Ā_ti R^it = 0 to R^tt).
- A causal block's IS and CS read the same query input in parallel, like LXMERT's two cross directions:
  both additions come from the block's old matrices, then are added. IS: R^ii += Ā_is R^ii, R^id += Ā_is R^id.
  CS: R^id += R̄^iiᵀ Ā_cs. A vision layer without CS (a plain self-attention, the IS-only base model) gets
  only the IS part.
- Every question self-attention layer precedes the fusion (shapes-catt): until then R^ti = R^td = 0, so only
  R^tt changes. Fusion, each layer in order: R^ti += R̄^ttᵀ Ā_ti R̄^ii (rule 10), R^td += Ā_ti R^id (rule 11
  carries the regions' relevance to the entries into the question).
- Residual normalisation (eqs. 8+9) is the guarded one of `methods.coattention`; no `official` variant:
  R^dd − I is zero everywhere, so the unguarded rule would make every CS addition, hence R^td, NaN.
- Read at [CLS] (row 0): `CausalRelevance`; `dictionary_share` = ΣR^td[0] / (ΣR^ti[0] + ΣR^td[0]).
- Gradient weighting makes IS and CS comparable: the answer's dependence on X̂ through `combine` is what
  reaches Ā_cs; with `combine`'s CS columns at zero, Ā_cs = 0 and the entries get exactly nothing.
`raw` and `attn-gradcam` use one map per attention, the last layer's (M_tt, M_ti, M_is, M_cs, heads averaged
or Grad-CAM weighted): [CLS] reaches the vision block only through the fusion, so regions = M_ti[0] M_is and
entries = M_ti[0] M_cs (the last IS and CS attention, reached by [CLS]'s row of the last fusion attention; no
residual, no accumulation), tokens = M_tt[0]. Under `raw` every attention row sums to 1, so regions and
entries have the same total and the dictionary share is 1/2 by construction.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from xattn_cli.capture.recorder import AttentionEvent, events_by_layer
from xattn_cli.methods.coattention import (
    cross_attention_additions,
    last_layer_baseline,
    self_attention_rule,
)
from xattn_cli.methods.relevancy import head_mean_positive, identity

Tensor = torch.Tensor


@dataclass(frozen=True)
class CausalRelevance:
    """[CLS]'s relevance rows: to the question's tokens (B, T) with [CLS] itself at 0, to the regions (B, I),
    and to the dictionary entries (B, K; K = 0 for a model without CS-ATT)."""

    tokens: Tensor
    regions: Tensor
    entries: Tensor

    @property
    def dictionary_share(self) -> Tensor:
        """Σ entries / (Σ regions + Σ entries) per sample, 0 where both are 0. (B,)."""
        to_entries = self.entries.sum(dim=-1)  # (B,)
        total = self.regions.sum(dim=-1) + to_entries  # (B,)
        return torch.where(total > 0, to_entries / torch.where(total > 0, total, 1), 0)


def _cam(event: AttentionEvent) -> Tensor:
    """Rule 5. (B, Nq, Nk)."""
    return head_mean_positive(event.probs, event.grad)


def _read_at_cls(r_tt: Tensor, r_ti: Tensor, r_td: Tensor) -> CausalRelevance:
    tokens = r_tt[:, 0].clone()  # (B, T)
    tokens[:, 0] = 0  # [CLS] does not explain itself
    return CausalRelevance(tokens, r_ti[:, 0], r_td[:, 0])


def _dictionary_by_layer(vision_self: Sequence[AttentionEvent], vision_to_dictionary: Sequence[AttentionEvent]
                         ) -> dict[int, AttentionEvent]:
    """The CS event of each causal block, keyed by its block's layer; every one must have its IS event."""
    by_layer = {event.layer: event for event in vision_to_dictionary}
    orphans = sorted(set(by_layer) - {event.layer for event in vision_self})
    if orphans:
        raise ValueError(f"dictionary attention in vision layers {orphans} has no in-sample attention")
    return by_layer


def causal_relevance(text_self: Sequence[AttentionEvent], vision_self: Sequence[AttentionEvent],
                     text_to_vision: Sequence[AttentionEvent], vision_to_dictionary: Sequence[AttentionEvent] = ()
                     ) -> CausalRelevance:
    """The co-attention rules through IS-ATT and CS-ATT (module docstring), read at [CLS].

    Args:
        text_self: the question's self-attention layers, all before the fusion.
        vision_self: the vision block's layers (each causal block's IS-ATT), in layer order.
        text_to_vision: the question→image fusion layers, in order.
        vision_to_dictionary: each causal block's CS-ATT, with its block's layer number (none: IS only).
    """
    fusion = list(events_by_layer(text_to_vision))
    if not fusion:
        raise ValueError("no question→image attention recorded")
    cross_sample = _dictionary_by_layer(vision_self, vision_to_dictionary)
    batch, _, tokens, regions = fusion[0].probs.shape
    like = fusion[0].probs
    entries = next(iter(cross_sample.values())).probs.shape[-1] if cross_sample else 0
    r_tt, r_ii, r_dd = (identity(batch, n, like) for n in (tokens, regions, entries))  # (B, N, N) each
    r_ti = like.new_zeros(batch, tokens, regions)  # (B, T, I)
    r_td = like.new_zeros(batch, tokens, entries)  # (B, T, K)
    r_id = like.new_zeros(batch, regions, entries)  # (B, I, K)

    for event in events_by_layer(text_self):
        r_tt, r_ti = self_attention_rule(_cam(event), r_tt, r_ti)
    for event in events_by_layer(vision_self):
        add_id = 0
        if event.layer in cross_sample:  # rule 10 from the block's old R^ii (R̄^dd = I)
            (dictionary,) = events_by_layer([cross_sample[event.layer]])
            add_id, _ = cross_attention_additions(_cam(dictionary), r_ii, r_dd, None)  # (B, I, K)
        r_ii, r_id = self_attention_rule(_cam(event), r_ii, r_id)
        r_id = r_id + add_id
    for event in fusion:
        add_ti, add_td = cross_attention_additions(_cam(event), r_tt, r_ii, r_id)  # rules 10 and 11 (x = d)
        r_ti, r_td = r_ti + add_ti, r_td + add_td
    return _read_at_cls(r_tt, r_ti, r_td)


def causal_last_layer(method: str, text_self: Sequence[AttentionEvent], vision_self: Sequence[AttentionEvent],
                      text_to_vision: Sequence[AttentionEvent], vision_to_dictionary: Sequence[AttentionEvent],
                      text_mask: Tensor, region_mask: Tensor) -> CausalRelevance:
    """`raw` or `attn-gradcam` on the last question self-attention, fusion, IS and CS attention (module
    docstring), read at [CLS]. The last causal block must be the last vision layer.

    `text_mask` (B, T) and `region_mask` (B, I), 1 for real tokens: attn-gradcam weighs each head by its
    gradient over the real query-key pairs only.
    """
    cross_sample = _dictionary_by_layer(vision_self, vision_to_dictionary)
    last_vision = max(event.layer for event in vision_self)
    if cross_sample and max(cross_sample) != last_vision:
        raise ValueError(f"the last causal block ({max(cross_sample)}) is not the last vision layer ({last_vision})")
    words = last_layer_baseline(method, text_self, text_mask, text_mask)  # (B, T, T)
    fusion = last_layer_baseline(method, text_to_vision, text_mask, region_mask)[:, :1]  # (B, 1, I): [CLS]'s row
    in_sample = last_layer_baseline(method, vision_self, region_mask, region_mask)  # (B, I, I)
    regions = torch.bmm(fusion, in_sample)  # (B, 1, I)
    if cross_sample:
        dictionary = cross_sample[last_vision]
        every_entry = region_mask.new_ones(region_mask.shape[0], dictionary.probs.shape[-1])  # (B, K)
        entries = torch.bmm(fusion, last_layer_baseline(method, [dictionary], region_mask, every_entry))  # (B, 1, K)
    else:
        entries = fusion.new_zeros(fusion.shape[0], 1, 0)  # (B, 1, 0)
    return _read_at_cls(words, regions, entries)
