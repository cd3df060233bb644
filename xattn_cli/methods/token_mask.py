"""Learned token masks: per image and target, the patches of a fixed budget that keep the model's decision
(reference/meat.md §2). Pure: the objective is any callable, so this module knows no model.

MEAT (Xue et al., CVPR 2022) learns two logits per patch, samples binary masks with straight-through
Gumbel-softmax, and steers the kept fraction with a squared keep-ratio loss, optimised by Adam at lr 0.1. Our
adaptation, not a reproduction: the logits are optimised per (image, target), like extremal masks, not per
task; they start at [+1, −1] (keep probability 0.88; MEAT: ±4, which barely moves in 100 steps); τ is annealed
geometrically 2 → 0.2 (MEAT: fixed 1); the final mask is the top k = round(λ·N) patches by logit margin, an
exact budget (MEAT's rule, margin > 0, is reported as the `threshold_fraction`).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from xattn_cli.nn.masked_attention import gumbel_noise, keep_ratio_loss, straight_through_gumbel

Objective = Callable[[torch.Tensor], torch.Tensor]
"""keep (B, N) over the patches, exact 0/1 with a straight-through gradient → (B,) scores to maximise."""


@dataclass(frozen=True)
class MaskSettings:
    ratio: float = 0.25  # λ: the kept fraction of patches
    steps: int = 100
    alpha: float = 10.0  # weight of the keep-ratio loss
    lr: float = 0.1
    tau: tuple[float, float] = (2.0, 0.2)  # Gumbel-softmax temperature, first step → last, geometric
    init: float = 1.0  # initial logits [+init, −init]: every patch starts likely kept


@dataclass
class LearnedMask:
    margins: torch.Tensor  # (B, N) keep logit − drop logit after the last step
    kept: torch.Tensor  # (B, N) bool: the top round(λ·N) patches by margin
    threshold_fraction: torch.Tensor  # (B,) the fraction with margin > 0 (MEAT's evaluation rule)


def item_seed(seed: int, content: bytes, target: str) -> int:
    """The Gumbel noise seed of one (image, target): from the run's seed, the item's content and the target,
    never its position in a batch."""
    return zlib.crc32(f"{seed}:{zlib.crc32(content)}:{target}".encode())


def temperature(step: int, steps: int, tau: tuple[float, float]) -> float:
    first, last = tau
    return first * (last / first) ** (step / max(1, steps - 1))


def top_k_keep(margins: torch.Tensor, ratio: float) -> torch.Tensor:
    """(B, N) margins → (B, N) bool with exactly k = round(λ·N) (at least 1) True per row; ties by index."""
    patches = margins.shape[-1]
    k = min(patches, max(1, round(ratio * patches)))
    order = torch.argsort(margins, dim=-1, descending=True, stable=True)[:, :k]  # (B, k)
    return torch.zeros_like(margins, dtype=torch.bool).scatter(-1, order, True)


def optimise_mask(objective: Objective, patches: int, seeds: Sequence[int], settings: MaskSettings = MaskSettings(),
                  device: str | torch.device = "cpu") -> LearnedMask:
    """Maximise objective(keep) − α·(mean keep − λ)² for each item (row) independently: the loss is a sum over
    items and Adam is elementwise, so an item's mask does not depend on the others in its batch."""
    logits = torch.tensor([settings.init, -settings.init], device=device).repeat(len(seeds), patches, 1)  # (B, N, 2)
    logits.requires_grad_(True)
    optimiser = torch.optim.Adam([logits], lr=settings.lr)
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    for step in range(settings.steps):
        noise = torch.stack([gumbel_noise((patches, 2), generator) for generator in generators]).to(device)  # (B, N, 2)
        keep = straight_through_gumbel(logits, temperature(step, settings.steps, settings.tau), noise)  # (B, N)
        loss = (settings.alpha * keep_ratio_loss(keep, settings.ratio) - objective(keep)).sum()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    margins = (logits[..., 0] - logits[..., 1]).detach()  # (B, N)
    return LearnedMask(margins, top_k_keep(margins, settings.ratio), (margins > 0).float().mean(dim=-1))
