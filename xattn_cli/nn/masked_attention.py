"""Token masks inside attention: the masked softmax Ψ, straight-through Gumbel-softmax keep samples, and the
keep-ratio loss (reference/meat.md).

Ψ is DynamicViT's `softmax_with_policy` (Rao et al., NeurIPS 2021, Eq. 11), which MEAT (Xue et al.,
"Meta-attention for ViT-backed Continual Learning", CVPR 2022) copies: with scores A (B, H, Nq, Nk) and a keep
vector m over the keys,

    Ψ_ij = P_ij e^{A_ij} / Σ_s P_is e^{A_is},    P_ij = m_j + (1 − m_j) δ_ij   (a query keeps its own key).

Where we differ from the official code (zju-vipa/MEAT-TIL, raoyongming/DynamicViT), on purpose:
- no ε: the official Ψ adds ε/N to every numerator and ε to the denominator (ε = 1e-6), leaking weight to
  masked keys; ours gives masked keys exactly 0, so a mask shared by every block equals dropping the tokens;
- the row maximum is taken over the kept keys only (detached), not over all keys, so a row whose maximum sits
  on a masked key does not underflow to ε's near-uniform row; a masked key's exponent is capped at
  `MASKED_EXPONENT_CAP` above it, which changes no forward value (P = 0 there) and keeps its gradient finite;
- the first `prefix` keys (CLS, registers) are always kept, inside Ψ rather than by the caller's policy;
- straight-through samples are written `hard + (soft − soft.detach())`, exact 0/1 in the forward pass
  (torch's `hard − soft.detach() + soft` can give 1 ± 1 ulp), with the Gumbel noise given by the caller
  (per-item generators: an item's mask never depends on its batch);
- the keep-ratio loss is returned per item, (mean m − λ)², one term per mask (MEAT sums one term per masked
  block over the batch mean; we share one mask over the blocks, see `capture.TokenMask`).
"""
from __future__ import annotations

import torch

MASKED_EXPONENT_CAP = 30.0  # nats a masked key's score may exceed the kept maximum by, in its (zero-weight) term


def _policy(keep: torch.Tensor, queries: int, prefix: int, keep_self: bool) -> torch.Tensor:
    """(B, Nk) keep → (B, 1, Nq, Nk) policy P: prefix keys kept, and each query's own key if `keep_self`."""
    keep = torch.cat([torch.ones_like(keep[:, :prefix]), keep[:, prefix:]], dim=1)  # (B, Nk)
    policy = keep[:, None, None, :].expand(-1, 1, queries, -1)  # (B, 1, Nq, Nk)
    if keep_self:
        eye = torch.eye(queries, keep.shape[1], dtype=keep.dtype, device=keep.device)  # (Nq, Nk)
        policy = policy + (1 - policy) * eye
    return policy


def masked_softmax(scores: torch.Tensor, keep: torch.Tensor, prefix: int = 1, keep_self: bool = True) -> torch.Tensor:
    """Ψ over the last dimension of `scores` (B, H, Nq, Nk) for `keep` (B, Nk) in [0, 1] (exact 0/1 in the
    forward pass; a straight-through sample carries its gradient). Masked keys get exactly 0."""
    policy = _policy(keep.to(scores.dtype), scores.shape[-2], prefix, keep_self)  # (B, 1, Nq, Nk)
    row_max = scores.masked_fill(policy == 0, float("-inf")).amax(dim=-1, keepdim=True).detach()  # (B, H, Nq, 1)
    weights = policy * torch.exp((scores - row_max).clamp(max=MASKED_EXPONENT_CAP))  # (B, H, Nq, Nk)
    return weights / weights.sum(dim=-1, keepdim=True)


def renormalise(probs: torch.Tensor, keep: torch.Tensor, prefix: int = 1, keep_self: bool = True) -> torch.Tensor:
    """Ψ from softmax probabilities (B, H, Nq, Nk), for backends that expose no scores: p·P / Σ p·P, which equals
    `masked_softmax` (softmax's normaliser cancels) unless every kept key is ~87 nats (float32) below the row max."""
    weights = probs * _policy(keep.to(probs.dtype), probs.shape[-2], prefix, keep_self)  # (B, H, Nq, Nk)
    return weights / weights.sum(dim=-1, keepdim=True)


def gumbel_noise(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Standard Gumbel noise −log(−log U) in float64 on the generator's device."""
    uniform = torch.rand(shape, generator=generator, dtype=torch.float64, device=generator.device)
    return -torch.log(-torch.log(uniform.clamp(min=torch.finfo(torch.float64).tiny)))


def straight_through_gumbel(logits: torch.Tensor, tau: float, noise: torch.Tensor) -> torch.Tensor:
    """Keep samples (...,) from two logits per token (..., 2) = (keep, drop): the forward value is the exact
    one-hot argmax of (logits + noise)/τ, the gradient that of the Gumbel-softmax (Jang et al., 2017)."""
    soft = ((logits + noise.to(logits)) / tau).softmax(dim=-1)[..., 0]  # (...,)
    hard = (soft > 0.5).to(soft.dtype)  # = argmax of the two channels
    return hard + (soft - soft.detach())


def keep_ratio_loss(keep: torch.Tensor, ratio: float) -> torch.Tensor:
    """MEAT's squared keep-ratio deviation per item: (mean_i m_i − λ)², (B, N) → (B,)."""
    return (keep.mean(dim=-1) - ratio) ** 2
