"""Gradient-weighted relevancy propagation (Chefer, Gur, Wolf, ICCV 2021) and attention baselines.

Pure functions of recorded attention (`AttentionEvent`s with probs and grads, each (B, H, N, M)).
Follows reference/chefer-relevancy.md. Differences from the official code: batches are first-class
(the official `avg_heads` folds the batch into the head axis), and the residual normalisation guards
rows that sum to zero instead of producing NaN by default (`residual="official"` keeps the NaN).
"""
from __future__ import annotations

from typing import Sequence

import torch

from xattn_cli.capture.recorder import AttentionEvent, events_by_layer
from xattn_cli.methods import RESIDUAL_RULES

Tensor = torch.Tensor


def head_mean_positive(probs: Tensor, grad: Tensor) -> Tensor:
    """Rule 5: Ā = E_h[(∇A ⊙ A)⁺]. (B, H, N, M) → (B, N, M)."""
    return (grad * probs).clamp(min=0).mean(dim=1)


def identity(batch: int, tokens: int, like: Tensor) -> Tensor:
    return torch.eye(tokens, dtype=like.dtype, device=like.device).expand(batch, tokens, tokens).clone()  # (B, N, N)


def self_attention_relevance(events: Sequence[AttentionEvent], start_layer: int = 0) -> Tensor:
    """Rules 6+7 over one self-attention stream: R = I; R ← R + Ā·R for each layer ≥ start_layer. (B, N, N)."""
    events = list(events_by_layer(events))
    batch, _, tokens, _ = events[0].probs.shape
    relevance = identity(batch, tokens, events[0].probs)
    for event in events:
        if event.layer < start_layer:
            continue
        relevance = relevance + torch.bmm(head_mean_positive(event.probs, event.grad), relevance)
    return relevance


def rollout(events: Sequence[AttentionEvent], start_layer: int = 0) -> Tensor:
    """Abnar & Zuidema: Â = rownorm(mean_h A + I); joint = Â_L ⋯ Â_start. (B, N, N)."""
    events = sorted(events, key=lambda e: e.layer)
    batch, _, tokens, _ = events[0].probs.shape
    joint = identity(batch, tokens, events[0].probs)
    for event in events:
        if event.layer < start_layer:
            continue
        augmented = event.probs.mean(dim=1) + identity(batch, tokens, event.probs)  # (B, N, N)
        joint = torch.bmm(augmented / augmented.sum(dim=-1, keepdim=True), joint)
    return joint


def raw_attention(events: Sequence[AttentionEvent]) -> Tensor:
    """Last layer's attention, heads averaged. (B, N, M)."""
    return max(events, key=lambda e: e.layer).probs.mean(dim=1)


def attention_gradcam(events: Sequence[AttentionEvent], valid: Tensor | None = None) -> Tensor:
    """Last layer, each head weighted by its mean gradient, heads averaged, positive part. (B, N, M).

    `valid` (B, N, M), for padded batches: the mean runs over the real query-key pairs only (a padded key
    has zero probability but not zero gradient), so each sample gets what it gets unpadded.
    """
    last = next(reversed(list(events_by_layer(events))))
    if valid is None:
        weights = last.grad.mean(dim=(2, 3), keepdim=True)  # (B, H, 1, 1)
    else:
        valid = valid[:, None].to(last.grad.dtype)  # (B, 1, N, M)
        weights = (last.grad * valid).sum(dim=(2, 3), keepdim=True) / valid.sum(dim=(2, 3), keepdim=True)  # (B, H, 1, 1)
    return (last.probs * weights).mean(dim=1).clamp(min=0)


def handle_residual(relevance: Tensor, eps: float = 1e-12, residual: str = "guarded") -> Tensor:
    """Eqs. 8+9: R̄ = rownorm(R − I) + I, zero-sum rows of R − I as `residual` says. (B, N, N)."""
    if residual not in RESIDUAL_RULES:
        raise ValueError(f"unknown residual rule {residual!r} (one of {', '.join(RESIDUAL_RULES)})")
    eye = torch.eye(relevance.shape[-1], dtype=relevance.dtype, device=relevance.device)
    hat = relevance - eye
    sums = hat.sum(dim=-1, keepdim=True)  # (B, N, 1)
    if residual == "official":
        return hat / sums + eye
    return torch.where(sums.abs() > eps, hat / torch.where(sums.abs() > eps, sums, 1), 0) + eye


def token_relevance(method: str, events: Sequence[AttentionEvent], start_layer: int = 0) -> Tensor:
    """The (B, N, N) token-to-token relevance of one self-attention stream under `method`."""
    if method == "chefer":
        return self_attention_relevance(events, start_layer)
    if method == "rollout":
        return rollout(events, start_layer)
    if method == "raw":
        return raw_attention(events)
    if method == "attn-gradcam":
        return attention_gradcam(events)
    raise ValueError(f"{method!r} is not a self-attention relevancy method")
