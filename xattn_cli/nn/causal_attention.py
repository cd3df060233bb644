"""Causal attention (CATT; Yang, Zhang, Qi, Cai, "Causal Attention for Vision-Language Tasks", CVPR 2021).

Front-door adjustment made attention: in-sample attention (IS-ATT) over the sample's own tokens,
Ẑ = V_I softmax(Q_Iᵀ K_I), and cross-sample attention (CS-ATT) of the same query input over a global
dictionary that summarises the training set, X̂ = V_C softmax(Q_Cᵀ K_C). The NWGM step feeds both to the
rest of the network; as in the official code (yangxuntu/lxmertcatt, `fc_lang`/`fc_visn`) they are fused by
one linear map of their concatenation, out = W [Ẑ ; X̂] + b.

Each branch is a `CrossAttention` with its own projections (the official fine-tuning layers, `bert_type
ft`; the seed's h(X) ≠ f(X)) reading the same query input. Both probability tensors pass through their
branch's `attn_drop` on their way to V, so two `AttentionSite(branch, ..., backend="dropout",
attribute="attn_drop")` record them: `in_sample` under the model's own stream (e.g. `text->vision`, or
`vision` for self-attention) and `cross_sample` under a dictionary stream (e.g. `text->dictionary`).

Where this differs from the official code (see shared/reference/catt.md):
- the dictionary is by default a frozen buffer of k-means centroids (the paper's description; the release
  learns an `nn.Parameter` from U[0, 0.01), available here as `learn_dictionary=True`, and its k-means
  branch is dead code);
- the fusion is per module, not once at the encoder output;
- no residual, LayerNorm or feed-forward inside: a block built from this module adds its own;
- padded queries get a zero output (the official code has no query mask on the CS branch).
"""
from __future__ import annotations

import torch
from torch import nn

from xattn_cli.errors import UsageError
from xattn_cli.nn.cross_attention import CrossAttention


class CausalAttention(nn.Module):
    """IS-ATT over the sample's tokens and CS-ATT over a K-entry dictionary, concatenated and projected.

    Args:
        query_dim: width of the query tokens.
        context_dim: width of the sample's key/value tokens (self-attention: `query_dim`).
        dim: width of both attentions and of the output; a multiple of `heads`.
        heads: attention heads of each branch.
        dictionary_size: K, the number of dictionary entries.
        dictionary_dim: width of an entry; `context_dim` if None.
        learn_dictionary: a trained `nn.Parameter` (the official code's choice) instead of a frozen buffer.
        dropout: dropout on both branches' attention probabilities (training only).

    The dictionary starts as U[0, 0.01) (the official initialisation); a frozen one is meant to be filled
    with k-means centroids by `load_dictionary` (`xattn_cli.dictionary`).
    """

    def __init__(self, query_dim: int, context_dim: int, dim: int, heads: int = 1, dictionary_size: int = 64,
                 dictionary_dim: int | None = None, learn_dictionary: bool = False, dropout: float = 0.0):
        super().__init__()
        entry_dim = dictionary_dim or context_dim
        self.in_sample = CrossAttention(query_dim, context_dim, dim, heads, dropout)
        self.cross_sample = CrossAttention(query_dim, entry_dim, dim, heads, dropout)
        self.combine = nn.Linear(2 * dim, dim)
        entries = torch.rand(dictionary_size, entry_dim) / 100  # (K, D), U[0, 0.01) as the official code
        if learn_dictionary:
            self.dictionary = nn.Parameter(entries)
        else:
            self.register_buffer("dictionary", entries)

    def load_dictionary(self, entries: torch.Tensor) -> None:
        """Replace the entries by `entries` (K, D) of the same shape (k-means centroids)."""
        if tuple(entries.shape) != tuple(self.dictionary.shape):
            raise UsageError(f"a dictionary of shape {tuple(entries.shape)} does not fit this causal attention, "
                             f"which takes {tuple(self.dictionary.shape)}")
        with torch.no_grad():
            self.dictionary.copy_(entries)

    def forward(self, queries: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None,
                query_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """queries (B, Nq, query_dim), context (B, Nk, context_dim); masks (B, Nq) / (B, Nk), nonzero = real.

        Returns the output (B, Nq, dim), the IS probabilities (B, heads, Nq, Nk) and the CS probabilities
        (B, heads, Nq, K). Dictionary entries are never masked; padded queries get all-zero rows and a zero
        output.
        """
        in_sample, p_in = self.in_sample(queries, context, context_mask, query_mask)  # (B, Nq, dim)
        entries = self.dictionary.unsqueeze(0).expand(queries.shape[0], -1, -1)  # (B, K, D)
        cross_sample, p_cross = self.cross_sample(queries, entries, None, query_mask)  # (B, Nq, dim)
        output = self.combine(torch.cat([in_sample, cross_sample], dim=-1))  # (B, Nq, dim)
        if query_mask is not None:
            output = output.masked_fill(~query_mask.bool()[..., None], 0.0)
        return output, p_in, p_cross
