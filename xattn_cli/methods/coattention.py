"""Relevancy across streams: bi-modal co-attention (LXMERT), single stream (VisualBERT) and
encoder-decoder attention (DETR). Chefer, Gur, Wolf, ICCV 2021, arXiv:2103.15679, rules 5-11.

Pure functions of recorded attention, batched: relevance matrices are (B, rows, columns). Follows
reference/chefer-relevancy.md §1.3-1.5, §2.3-2.5. Differences from the official code: batches are
first-class, and by default (`residual="guarded"`) the residual normalisation (eqs. 8+9) leaves a row of
R − I that sums to zero (never updated) at the identity instead of turning it into NaN. One NaN row spreads
through R̄ᵀ to the whole rule-10 addition, and the official DETR code then zeroes all of it: that layer adds
nothing. This is not rare: on the bundled shapes-detr (50 scenes of seed 23000, 134 detections above 0.5)
it fires in 75 detections (56 %) and changes the min-max map by up to 0.87. `residual="official"` reproduces
the official rule; the two agree whenever the official result has no NaN.
Under the guard, padded tokens (zero probability as keys, zero gradient as queries) stay inert, so a padded
batch gives what unpadded single runs give.
"""
from __future__ import annotations

from typing import Sequence

import torch

from xattn_cli.capture.recorder import AttentionEvent, events_by_layer
from xattn_cli.methods.relevancy import attention_gradcam, handle_residual, head_mean_positive, identity, raw_attention

Tensor = torch.Tensor


def _cam(event: AttentionEvent) -> Tensor:
    """Rule 5 on one recorded attention. (B, Nq, Nk)."""
    return head_mean_positive(event.probs, event.grad)


def self_attention_rule(cam_ss: Tensor, r_ss: Tensor, r_sq: Tensor) -> tuple[Tensor, Tensor]:
    """Rules 6+7: R^ss ← R^ss + Ā R^ss, R^sq ← R^sq + Ā R^sq. cam (B, S, S); returns (B, S, S), (B, S, Q)."""
    return r_ss + torch.bmm(cam_ss, r_ss), r_sq + torch.bmm(cam_ss, r_sq)


def cross_attention_additions(cam_sq: Tensor, r_ss: Tensor, r_qq: Tensor, r_qs: Tensor | None,
                              residual: str = "guarded") -> tuple[Tensor, Tensor | None]:
    """Rules 10+11 for queries of stream s attending keys of stream q.

    Rule 10: ΔR^sq = R̄^ssᵀ Ā^sq R̄^qq (R̄: residual-normalised, eqs. 8+9). Rule 11: ΔR^ss = Ā^sq R^qs
    (None when there is no R^qs, as in DETR). cam (B, S, Q); returns (B, S, Q), (B, S, S) | None.
    `residual="official"`: the official DETR rule, unguarded eqs. 8+9 and the NaNs of ΔR^sq set to 0.
    """
    normalised_ss = handle_residual(r_ss, residual=residual)  # (B, S, S)
    normalised_qq = handle_residual(r_qq, residual=residual)  # (B, Q, Q)
    add_sq = torch.bmm(normalised_ss.transpose(1, 2), torch.bmm(cam_sq, normalised_qq))  # (B, S, Q)
    if residual == "official":
        add_sq = torch.where(torch.isnan(add_sq), 0, add_sq)
    add_ss = None if r_qs is None else torch.bmm(cam_sq, r_qs)  # (B, S, S)
    return add_sq, add_ss


def _checked(events: Sequence[AttentionEvent], count: int, what: str) -> list[AttentionEvent]:
    events = sorted(events, key=lambda e: e.layer)
    if len(events) < count:
        raise ValueError(f"expected at least {count} {what} attention events, got {len(events)}")
    return events


def bimodal_relevance(text_self: Sequence[AttentionEvent], vision_self: Sequence[AttentionEvent],
                      text_to_vision: Sequence[AttentionEvent], vision_to_text: Sequence[AttentionEvent]
                      ) -> tuple[Tensor, Tensor]:
    """LXMERT (reference §2.4): R^tt (B, T, T) with R^tt[:, 0, 0] = 0, and R^ti (B, T, I).

    Args:
        text_self: language-layer self-attention, then each cross-modality layer's language self-attention
            (the last `len(text_to_vision)` events), in layer order.
        vision_self: object-relationship layers, then each cross-modality layer's vision self-attention.
        text_to_vision, vision_to_text: the two directions of each cross-modality layer.
    The answer is read from row 0 ([CLS]). The last cross-modality layer contributes only its text side
    (text→vision cross attention, then language self-attention): nothing else reaches [CLS].
    """
    cross_layers = len(text_to_vision)
    if cross_layers == 0:
        raise ValueError("no cross-modality layers recorded")
    text_self = _checked(text_self, cross_layers, "text self")
    vision_self = _checked(vision_self, cross_layers, "vision self")
    text_to_vision = sorted(text_to_vision, key=lambda e: e.layer)
    vision_to_text = _checked(vision_to_text, cross_layers, "vision→text")
    language_layers = len(text_self) - cross_layers
    relation_layers = len(vision_self) - cross_layers
    batch, _, tokens, regions = text_to_vision[0].probs.shape
    like = text_to_vision[0].probs
    r_tt, r_ii = identity(batch, tokens, like), identity(batch, regions, like)  # (B, T, T), (B, I, I)
    r_ti = like.new_zeros(batch, tokens, regions)  # (B, T, I)
    r_it = like.new_zeros(batch, regions, tokens)  # (B, I, T)

    for event in events_by_layer(text_self[:language_layers]):
        r_tt, r_ti = self_attention_rule(_cam(event), r_tt, r_ti)
    for event in events_by_layer(vision_self[:relation_layers]):
        r_ii, r_it = self_attention_rule(_cam(event), r_ii, r_it)
    for layer in range(cross_layers):
        last = layer == cross_layers - 1
        (t2v,) = events_by_layer([text_to_vision[layer]])
        add_ti, add_tt = cross_attention_additions(_cam(t2v), r_tt, r_ii, r_it)
        if not last:  # both directions from the same (old) matrices, then all four added
            (v2t,) = events_by_layer([vision_to_text[layer]])
            add_it, add_ii = cross_attention_additions(_cam(v2t), r_ii, r_tt, r_ti)
            r_it, r_ii = r_it + add_it, r_ii + add_ii
        r_ti, r_tt = r_ti + add_ti, r_tt + add_tt
        (lang,) = events_by_layer([text_self[language_layers + layer]])
        r_tt, r_ti = self_attention_rule(_cam(lang), r_tt, r_ti)
        if not last:
            (visn,) = events_by_layer([vision_self[relation_layers + layer]])
            r_ii, r_it = self_attention_rule(_cam(visn), r_ii, r_it)
    r_tt = r_tt.clone()
    r_tt[:, 0, 0] = 0  # [CLS] does not explain itself
    return r_tt, r_ti


def pooled_row(relevance: Tensor, pooled: Tensor) -> Tensor:
    """Row `pooled[b]` of each sample's (N, N) relevance, its own entry zeroed (reference §2.3). (B, N)."""
    rows = relevance[torch.arange(relevance.shape[0], device=relevance.device), pooled].clone()  # (B, N)
    rows[torch.arange(rows.shape[0], device=rows.device), pooled] = 0
    return rows


def encoder_decoder_relevance(encoder_self: Sequence[AttentionEvent], decoder_self: Sequence[AttentionEvent],
                              decoder_cross: Sequence[AttentionEvent], residual: str = "guarded") -> Tensor:
    """DETR (reference §2.5): R^qi (B, queries, image tokens).

    R^ii = I, R^qq = I, R^qi = 0. Encoder: R^ii ← R^ii + Ā R^ii. Each decoder layer: the self rule on
    (R^qq, R^qi), then R^qi ← R^qi + R̄^qqᵀ Ā^qi R̄^ii. `residual`: "guarded" (default) or "official",
    see the module docstring.
    """
    decoder_self = sorted(decoder_self, key=lambda e: e.layer)
    decoder_cross = sorted(decoder_cross, key=lambda e: e.layer)
    if not decoder_cross or len(decoder_self) != len(decoder_cross):
        raise ValueError("expected one decoder self- and one cross-attention event per decoder layer")
    batch, _, queries, tokens = decoder_cross[0].probs.shape
    like = decoder_cross[0].probs
    r_ii, r_qq = identity(batch, tokens, like), identity(batch, queries, like)  # (B, I, I), (B, Q, Q)
    r_qi = like.new_zeros(batch, queries, tokens)  # (B, Q, I)
    for event in events_by_layer(encoder_self):
        r_ii = r_ii + torch.bmm(_cam(event), r_ii)
    for self_event, cross_event in zip(events_by_layer(decoder_self), events_by_layer(decoder_cross)):
        r_qq, r_qi = self_attention_rule(_cam(self_event), r_qq, r_qi)
        add_qi, _ = cross_attention_additions(_cam(cross_event), r_qq, r_ii, None, residual)
        r_qi = r_qi + add_qi
    return r_qi


def last_layer_baseline(method: str, events: Sequence[AttentionEvent], query_mask: Tensor | None = None,
                        key_mask: Tensor | None = None) -> Tensor:
    """`raw` or `attn-gradcam` on the last layer of `events` (reference §3): LXMERT's last text→vision cross
    attention and last language self-attention, VisualBERT's last layer, DETR's last decoder cross
    attention. (B, Nq, Nk).

    `query_mask` (B, Nq) and `key_mask` (B, Nk), 1 for real tokens, keep attn-gradcam's head weights to the
    real query-key pairs of a padded batch.
    """
    if method == "raw":
        return raw_attention(events)
    if method != "attn-gradcam":
        raise ValueError(f"{method!r} is not a last-layer baseline (raw or attn-gradcam)")
    valid = None if query_mask is None else query_mask[:, :, None] * key_mask[:, None, :]  # (B, Nq, Nk)
    return attention_gradcam(events, valid)
