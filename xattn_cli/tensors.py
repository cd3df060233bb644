"""Generic tensor operations shared by every package: attention heads, min-max scaling, and `to_image`,
the one function that turns token or region relevance into maps at an image's size.

Imports torch only; nothing here knows models, methods or files.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def merge_heads(x: Tensor) -> Tensor:
    batch, heads, tokens, d_head = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * d_head)  # (B, n, D)


def split_heads(x: Tensor, heads: int) -> Tensor:
    batch, tokens, width = x.shape
    return x.view(batch, tokens, heads, width // heads).transpose(1, 2)  # (B, H, n, d_head)


def min_max(values: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """(values − min) / (max − min) along `dim`; constant slices become 0. Also returns the flags."""
    low = values.amin(dim=dim, keepdim=True)
    span = values.amax(dim=dim, keepdim=True) - low
    degenerate = ~(span > 0) | ~torch.isfinite(span)
    scaled = torch.where(degenerate, torch.zeros_like(values), (values - low) / torch.where(degenerate, 1, span))
    return scaled, degenerate.squeeze(dim)


def paint_boxes(values: Tensor, boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """(R,) values of (R, 4) boxes (x0, y0, x1, y1 as fractions of the width and height) → (H, W): each pixel
    takes the largest value of the boxes that cover its centre, 0 where none does."""
    height, width = size
    ys = (torch.arange(height, dtype=boxes.dtype, device=boxes.device) + 0.5) / height  # (H,)
    xs = (torch.arange(width, dtype=boxes.dtype, device=boxes.device) + 0.5) / width  # (W,)
    inside_y = (ys[None, :] >= boxes[:, 1:2]) & (ys[None, :] < boxes[:, 3:4])  # (R, H)
    inside_x = (xs[None, :] >= boxes[:, 0:1]) & (xs[None, :] < boxes[:, 2:3])  # (R, W)
    inside = inside_y[:, :, None] & inside_x[:, None, :]  # (R, H, W)
    painted = torch.where(inside, values.to(boxes.dtype)[:, None, None], torch.zeros((), dtype=boxes.dtype))
    return painted.amax(dim=0) if len(values) else torch.zeros(height, width)  # (H, W)


def to_image(relevance: Tensor, size: tuple[int, int], *, grid: tuple[int, int] | None = None,
             boxes: Tensor | None = None, scale_first: bool = False) -> tuple[Tensor, Tensor]:
    """Token or region relevance → maps of (H, W) = `size` in [0, 1], and their `degenerate` flags.

    Args:
        relevance: (..., N), one value per patch (row-major on `grid`) or, with `boxes`, per region (1-D).
        grid: (gh, gw): patches are upsampled bilinearly (align_corners=False).
        boxes: (N, 4) region boxes: each pixel takes the largest relevance of the boxes over it.
        scale_first: min-max over the N tokens before upsampling, clamped after (CLIP Surgery's order);
            otherwise min-max over the pixels after upsampling, NaN read as 0 (Chefer's order).
    Returns:
        maps (..., H, W) float32 and degenerate (...) bool: constant (or non-finite) input gives zeros.
    """
    if boxes is not None:
        painted = paint_boxes(relevance.detach(), boxes, size).reshape(-1)  # (H·W,)
        scaled, degenerate = min_max(torch.nan_to_num(painted.float(), nan=0.0), dim=0)
        return scaled.reshape(size), degenerate
    if grid is None:
        raise ValueError("to_image needs a patch grid or region boxes")
    leading = relevance.shape[:-1]
    values = relevance.detach().float().reshape(-1, 1, *grid)  # (M, 1, gh, gw)
    if scale_first:
        scaled, degenerate = min_max(values.flatten(1), dim=1)  # (M, N), (M,)
        maps = F.interpolate(scaled.reshape(-1, 1, *grid), size=tuple(size), mode="bilinear", align_corners=False)
        return maps.clamp(0, 1).reshape(*leading, *size), degenerate.reshape(leading)
    upsampled = F.interpolate(values, size=tuple(size), mode="bilinear", align_corners=False).flatten(1)  # (M, H·W)
    scaled, degenerate = min_max(torch.nan_to_num(upsampled, nan=0.0), dim=1)
    return scaled.reshape(*leading, *size), degenerate.reshape(leading)
