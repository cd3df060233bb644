"""CLIP Surgery (Li et al., arXiv 2304.05653): architecture surgery and feature surgery.

Follows reference/clip-surgery.md, read off xmed-lab/CLIP_Surgery. Where we differ from the official code:
- the number of surgery blocks is a parameter (the official code hard-codes the last 6);
- other input sizes interpolate a copy of the positional table (the official code overwrites it);
- feature surgery uses the exact scalar form w_a·s_ia − mean_b(w_b·s_ib) with per-image class weights,
  so batches > 1 work and no (B, n, K, E) tensor is built;
- constant similarity columns give all-zero maps (flagged `degenerate`) instead of 0/0 = NaN.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from xattn_cli.tensors import merge_heads, min_max, to_image

Tensor = torch.Tensor


@dataclass(frozen=True)
class BlockView:
    """How the dual path sees one pre-norm transformer block of any implementation.

    forward: the unmodified block, (B, n, D) → (B, n, D).
    norm1: the attention input norm. qkv: normed tokens → q, k, v, each (B, heads, n, d_head).
    attention_out: merged heads (B, n, D) → the residual update (output projection, layer scale).
    ffn_residual: x → x + FFN(norm2(x)), the rest of the block.
    """

    forward: Callable[[Tensor], Tensor]
    norm1: Callable[[Tensor], Tensor]
    qkv: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]
    attention_out: Callable[[Tensor], Tensor]
    ffn_residual: Callable[[Tensor], Tensor]


def vv_attention(v: Tensor) -> Tensor:
    """softmax(d_head^-1/2 · V Vᵀ) V per head: (B, H, n, d) → (B, H, n, d)."""
    return F.scaled_dot_product_attention(v, v, v)


def dual_path(tokens: Tensor, blocks: Sequence[BlockView], surgery_blocks: int) -> Tensor:
    """Architecture surgery of a ViT: run the original stream and the v-v stream side by side.

    The last `surgery_blocks` blocks each add their v-v attention output, computed from norm1 of the
    ORIGINAL stream, to a new stream that starts at the original residual and skips every FFN
    (reference §2.3). Token 0 (CLS) is taken from the original stream.

    Args:
        tokens: embedded tokens (B, n, D), CLS first.
        blocks: the tower's blocks, first to last.
        surgery_blocks: how many of the last blocks get the v-v path (1..len(blocks)).
    Returns:
        (B, n, D) tokens before the final norm and projection.
    """
    original, surgical = dual_streams(tokens, blocks, surgery_blocks)
    return torch.cat([original[:, :1], surgical[:, 1:]], dim=1)  # (B, n, D)


def dual_streams(tokens: Tensor, blocks: Sequence[BlockView], surgery_blocks: int) -> tuple[Tensor, Tensor]:
    """`dual_path`'s two streams, each (B, n, D): the original one and the v-v one (for towers whose
    readout needs every original token, e.g. an attention-pool head)."""
    if not 1 <= surgery_blocks <= len(blocks):
        raise ValueError(f"surgery blocks must be in 1..{len(blocks)}, got {surgery_blocks}")
    first = len(blocks) - surgery_blocks
    for block in blocks[:first]:
        tokens = block.forward(tokens)
    original, surgical = tokens, tokens
    for block in blocks[first:]:
        q, k, v = block.qkv(block.norm1(original))  # each (B, H, n, d_head)
        attended = F.scaled_dot_product_attention(q, k, v)  # (B, H, n, d_head)
        original = block.ffn_residual(original + block.attention_out(merge_heads(attended)))
        surgical = surgical + block.attention_out(merge_heads(vv_attention(v)))
    return original, surgical


def interpolate_grid_embedding(table: Tensor, grid: tuple[int, int], prefix: int = 1) -> Tensor:
    """Resize a (prefix + g0², D) positional table to (prefix + gh·gw, D); bilinear, on a copy."""
    patches = table[prefix:]
    side = int(round(patches.shape[0] ** 0.5))
    if side * side != patches.shape[0]:
        raise ValueError(f"positional table of {patches.shape[0]} patches is not a square grid")
    if (side, side) == tuple(grid):
        return table
    image = patches.reshape(1, side, side, -1).permute(0, 3, 1, 2)  # (1, D, g0, g0)
    resized = F.interpolate(image.float(), size=tuple(grid), mode="bilinear", align_corners=False)
    resized = resized.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1).to(table.dtype)  # (gh·gw, D)
    return torch.cat([table[:prefix], resized], dim=0)


def feature_surgery(image_features: Tensor, text_features: Tensor, redundant: Tensor | None = None) -> Tensor:
    """Similarity of every token to every text with the redundant feature removed (reference §3.2, §3.3).

    Args:
        image_features: (B, n, E) surgery tokens, token 0 = CLS; normalised here per token.
        text_features: (K, E) text embeddings; normalised here.
        redundant: (E,) embedding of the empty class. Given: S = F_i·(t_a − r). None: class-weighted
            surgery, S = w_a·s_ia − mean_b(w_b·s_ib) with w = K·softmax(2·s_0) from the CLS token.
    Returns:
        (B, n, K) similarities.
    """
    image_features = F.normalize(image_features, dim=-1)
    text_features = F.normalize(text_features, dim=-1)
    similarity = image_features @ text_features.T  # (B, n, K)
    if redundant is not None:
        return similarity - image_features @ F.normalize(redundant, dim=-1)[:, None]  # (B, n, K)
    weights = text_features.shape[0] * torch.softmax(2 * similarity[:, :1], dim=-1)  # (B, 1, K)
    weighted = weights * similarity  # (B, n, K)
    return weighted - weighted.mean(dim=-1, keepdim=True)


def similarity_map(similarity: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """Patch similarities → per-class maps at the original image size (reference §4): min-max over the
    patches, bilinear upsampling, clamp.

    Args:
        similarity: (B, n, K), token 0 = CLS (dropped).
        grid: (gh, gw) patch grid, row-major.
        size: (H, W) of the original image.
    Returns:
        (B, K, H, W) in [0, 1].
    """
    maps, _ = to_image(similarity[:, 1:].transpose(1, 2), size, grid=grid, scale_first=True)  # (B, K, H, W)
    return maps


def similarity_to_points(similarity: Tensor, grid: tuple[int, int], size: tuple[int, int],
                         threshold: float = 0.8, down_sample: int = 2) -> tuple[list[list[int]], list[int]]:
    """SAM point prompts from one class's raw patch similarities (reference §5.3).

    Returns `num` positive points (the highest cells, in ascending order as the official code lists
    them) then `num` negative points (the lowest), as [x, y] pixels of the original image, and their
    labels (1 then 0).
    """
    height, width = size
    cells = (grid[0] // down_sample, grid[1] // down_sample)
    coarse = F.interpolate(similarity.reshape(1, 1, *grid).float(), size=cells, mode="bilinear",
                           align_corners=False).reshape(-1)  # (h'·w',)
    coarse, _ = min_max(coarse, dim=0)
    order = torch.argsort(coarse)  # ascending
    count = min(int((coarse >= threshold).sum()), coarse.numel() // 2)
    chosen = torch.cat([order[-count:], order[:count]]) if count else order[:0]
    points = []
    for index in chosen.tolist():
        row, col = divmod(index, cells[1])
        x = min((col + 0.5) * width / cells[1], width - 1)
        y = min((row + 0.5) * height / cells[0], height - 1)
        points.append([int(x), int(y)])
    return points, [1] * count + [0] * count


def text_ensemble(encode: Callable[[list[str]], Tensor], names: Sequence[str], templates: Sequence[str]) -> Tensor:
    """Per name: encode every template, normalise, average, normalise again (reference §3.1). (K, E)."""
    embeddings = []
    for name in names:
        prompts = F.normalize(encode([template.format(name) for template in templates]), dim=-1)  # (T, E)
        embeddings.append(F.normalize(prompts.mean(dim=0), dim=-1))
    return torch.stack(embeddings)  # (K, E)
