"""Multi-head cross attention: queries from one modality (text), keys and values from another (image).

softmax(Q Kᵀ / √d) V per head, as in the seed article (seed 002: text as Query, image as Key/Value,
linear maps to a common width, an output projection), made multi-head, with padding masks. The
probabilities pass through `attn_drop` on their way to V, so `AttentionSite(module, ..., backend="dropout",
attribute="attn_drop")` records exactly the tensor that multiplies V, and its gradient.
"""
from __future__ import annotations

import torch
from torch import nn


class CrossAttention(nn.Module):
    """Text queries attend image keys/values.

    Args:
        query_dim: width of the query tokens (text).
        context_dim: width of the key/value tokens (image regions or patches).
        dim: width of the attention and of the output; a multiple of `heads`.
        heads: number of attention heads.
        dropout: dropout on the attention probabilities (training only).
    """

    def __init__(self, query_dim: int, context_dim: int, dim: int, heads: int = 1, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
        self.heads = heads
        self.query = nn.Linear(query_dim, dim)
        self.key = nn.Linear(context_dim, dim)
        self.value = nn.Linear(context_dim, dim)
        self.out = nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(dropout)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        return x.view(batch, tokens, self.heads, width // self.heads).transpose(1, 2)  # (B, H, N, d)

    def forward(self, queries: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None,
                query_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """queries (B, Nq, query_dim), context (B, Nk, context_dim); masks (B, Nq) / (B, Nk), nonzero = real token.

        Returns the output (B, Nq, dim) and the per-head probabilities (B, heads, Nq, Nk). Padded keys get
        probability 0; padded queries get an all-zero row and a zero output.
        """
        q = self._split(self.query(queries))  # (B, H, Nq, d)
        k = self._split(self.key(context))  # (B, H, Nk, d)
        v = self._split(self.value(context))  # (B, H, Nk, d)
        scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5  # (B, H, Nq, Nk)
        keep = torch.ones(scores.shape[0], 1, scores.shape[2], scores.shape[3], dtype=torch.bool, device=scores.device)
        if context_mask is not None:
            keep = keep & context_mask.bool()[:, None, None, :]  # (B, 1, Nq, Nk)
        if query_mask is not None:
            keep = keep & query_mask.bool()[:, None, :, None]
        scores = scores.masked_fill(~keep, float("-inf"))
        probs = scores.softmax(dim=-1).masked_fill(~keep, 0.0)  # (B, H, Nq, Nk); rows with no key: all 0, not NaN
        probs = self.attn_drop(probs)
        context_out = (probs @ v).transpose(1, 2).flatten(2)  # (B, Nq, dim)
        output = self.out(context_out)  # (B, Nq, dim)
        if query_mask is not None:
            output = output.masked_fill(~query_mask.bool()[..., None], 0.0)
        return output, probs
