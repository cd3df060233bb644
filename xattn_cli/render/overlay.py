"""Heatmap overlays: a relevance map blended over its image through a matplotlib colormap."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

if TYPE_CHECKING:
    from matplotlib.colors import Colormap

Point = tuple[int, int]
Box = tuple[float, float, float, float, str]
"""(x0, y0, x1, y1, label) in pixels of the image; an empty label draws no text."""

LIGHT = (255, 255, 255)
"""Point borders, box outlines and label text: white stands out on every common colormap."""
DARK = (0, 0, 0)
"""Point centres and label backgrounds, so white marks stay visible on light images too."""


def overlay_heatmap(
    image: Image.Image,
    heatmap: np.ndarray,
    alpha: float = 0.5,
    colormap: str = "jet",
    points: Sequence[Point] | None = None,
    boxes: Sequence[Box] | None = None,
) -> Image.Image:
    """Blend `heatmap` (H×W, values in [0, 1], at the image's size) over `image` as an RGB image.

    Each pixel is `(1 - alpha) * image + alpha * colormap(heatmap)`; non-finite map values count as 0
    and values outside [0, 1] are clipped. Optional `points` (x, y) are drawn as white-bordered dots and
    `boxes` as labelled rectangles on top. Raises ValueError for a map of another size, an alpha outside
    [0, 1] or an unknown colormap name.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    heat = np.asarray(heatmap, dtype=np.float32)
    if heat.shape != (image.height, image.width):
        size = (image.height, image.width)
        raise ValueError(f"heatmap shape {heat.shape} does not match the image's (H, W) = {size}")
    heat = np.clip(np.nan_to_num(heat, nan=0.0, posinf=0.0, neginf=0.0), 0.0, 1.0)
    coloured = Image.fromarray(_colormap(colormap)(heat, bytes=True)[..., :3])
    blended = Image.blend(image.convert("RGB"), coloured, alpha)
    draw = ImageDraw.Draw(blended)
    for x, y in points or ():
        _draw_point(draw, x, y, radius=max(2, min(image.size) // 100))
    for x0, y0, x1, y1, label in boxes or ():
        _draw_box(draw, (x0, y0, x1, y1), label)
    return blended


def _colormap(name: str) -> Colormap:
    """The named matplotlib colormap. matplotlib is imported here, not at module import, to keep CLI
    start-up fast; no pyplot and no backend are involved, so a notebook's backend is left alone."""
    import matplotlib

    try:
        return matplotlib.colormaps[name]
    except KeyError as exc:
        raise ValueError(f"unknown colormap {name!r}") from exc


def _draw_point(draw: ImageDraw.ImageDraw, x: int, y: int, radius: int) -> None:
    """A dark dot with a white border centred on (x, y)."""
    draw.ellipse(
        (x - radius, y - radius, x + radius, y + radius),
        fill=DARK,
        outline=LIGHT,
        width=max(1, radius // 2),
    )


def _draw_box(draw: ImageDraw.ImageDraw, corners: tuple[float, float, float, float], label: str) -> None:
    """A white rectangle with its label on a dark tab at the top-left corner."""
    x0, y0, x1, y1 = corners
    draw.rectangle((min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)), outline=LIGHT, width=2)
    if label:
        anchor = (min(x0, x1) + 2, min(y0, y1) + 2)
        draw.rectangle(draw.textbbox(anchor, label), fill=DARK)
        draw.text(anchor, label, fill=LIGHT)


def overlay_kept(image: Image.Image, kept: np.ndarray, dim: float = 0.35) -> Image.Image:
    """The kept pixels of `kept` (H×W, 1 = kept, at the image's size) at full brightness, the rest dimmed to
    `dim`, and the kept region's border drawn in white. Raises ValueError for a mask of another size."""
    keep = np.asarray(kept) > 0.5
    if keep.shape != (image.height, image.width):
        raise ValueError(f"mask shape {keep.shape} does not match the image's (H, W) = {(image.height, image.width)}")
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    shown = np.where(keep[..., None], pixels, dim * pixels)
    padded = np.pad(keep, 1, constant_values=False)
    inside = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]  # 4 neighbours kept
    shown[keep & ~inside] = LIGHT
    return Image.fromarray(shown.round().astype(np.uint8))
