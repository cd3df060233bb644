"""The public Python API: what the CLI calls, usable from notebooks and other tools."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from PIL import Image

from xattn_cli.explainers.base import resolve_device
from xattn_cli.io.images import load_image
from xattn_cli.models.registry import load_model as _load_model
from xattn_cli.results import Explanation


def load_model(name: str, pretrained: str | None = None, device: str = "auto"):
    """The adapter for a registered or prefixed model name (see `xattn models`)."""
    return _load_model(name, pretrained, resolve_device(device))


def _as_images(images: Sequence[str | Path | Image.Image]) -> list[tuple[str, Image.Image]]:
    return [(f"<image {i}>", image) if isinstance(image, Image.Image) else (str(image), load_image(image))
            for i, image in enumerate(images)]


def surgery(images: Sequence[str | Path | Image.Image], texts: Sequence[str], *, model: str = "shapes-clip",
            pretrained: str | None = None, device: str = "auto", ensemble: bool = True,
            size: tuple[int, int] | None = None, blocks: int | None = None, points: int = 0,
            batch_size: int = 8, text_cache: bool = True) -> list[Explanation]:
    """CLIP Surgery similarity maps of each image for each text.

    Args:
        images: paths or PIL images.
        texts: one or more class names or phrases.
        size: (H, W) model input size; default the model's own.
        blocks: number of last blocks given the v-v path; default min(6, depth) or the model's config.
        points: with K > 0, each target carries up to K SAM-style positive points.
        text_cache: reuse text embeddings across runs (see `xattn_cli.cache`).
    Returns:
        One `Explanation` per image, with `.maps` (K, H, W) in [0, 1] and `.scores` (cosine similarity).
    """
    from xattn_cli.explainers.surgery import SurgeryExplainer

    adapter = load_model(model, pretrained, device)
    explainer = SurgeryExplainer(adapter, texts, ensemble=ensemble, size=size, blocks=blocks, points=points,
                                  text_cache=text_cache)
    loaded = _as_images(images)
    results = []
    for start in range(0, len(loaded), batch_size):
        chunk = loaded[start : start + batch_size]
        for (name, image), targets in zip(chunk, explainer.explain([image for _, image in chunk])):
            results.append(Explanation(name, image.size, targets))
    return results
