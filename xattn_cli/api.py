"""The public Python API: what the CLI calls, usable from notebooks and other tools.

The entry points run the CLI's batch loop (`runner.explained`) and return `Explanation`s in memory
instead of writing files.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from PIL import Image

from xattn_cli.device import resolve_device
from xattn_cli.io.images import load_image
from xattn_cli.models.registry import load_model as _load_model
from xattn_cli.results import Explanation


def load_model(name: str, pretrained: str | None = None, device: str = "auto"):
    """The adapter for a registered or prefixed model name (see `xattn models`)."""
    return _load_model(name, pretrained, resolve_device(device))


def build_explainer(method: str, *, model: str, pretrained: str | None = None, device: str = "auto",
                    texts: Sequence[str] = (), **options):
    """The explainer that `surgery`, `relevancy` or `mask` runs for `method` (see `xattn_cli.methods.METHODS`),
    with its model loaded, for callers that drive the batch loop themselves (`xattn_cli.integrations.ray`).
    `options` are those keyword arguments of that function; mask's `keep_ratio` and `steps` included."""
    from xattn_cli.methods import METHODS

    kind = METHODS[method].explainer if method in METHODS else "relevancy"  # which refuses it, naming the model's
    adapter = load_model(model, pretrained, device)
    if kind == "surgery":
        from xattn_cli.explainers.surgery import SurgeryExplainer

        return SurgeryExplainer(adapter, texts, **options)
    if kind == "mask":
        from xattn_cli.explainers.mask import MaskExplainer
        from xattn_cli.methods.token_mask import MaskSettings

        settings = MaskSettings(ratio=options.pop("keep_ratio", MaskSettings.ratio),
                                steps=options.pop("steps", MaskSettings.steps))
        return MaskExplainer(adapter, texts=texts, settings=settings, **options)
    from xattn_cli.explainers import build_relevancy

    return build_relevancy(adapter, method=method, texts=texts, **options)


def _explain(explainer, images: Sequence[str | Path | Image.Image], batch_size: int) -> list[Explanation]:
    from xattn_cli.runner import explained

    items = [(f"<image {i}>", image, None) if isinstance(image, Image.Image) else (str(image), load_image(image), None)
             for i, image in enumerate(images)]
    results = []
    for name, image, outcome, _ in explained(explainer, items, batch_size):
        if isinstance(outcome, BaseException):
            raise outcome
        results.append(Explanation(name, image.size, outcome))
    return results


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
    explainer = build_explainer("surgery", model=model, pretrained=pretrained, device=device, texts=texts,
                                ensemble=ensemble, size=size, blocks=blocks, points=points, text_cache=text_cache)
    return _explain(explainer, images, batch_size)


def relevancy(images: Sequence[str | Path | Image.Image], *, model: str = "shapes-vit", method: str = "chefer",
              pretrained: str | None = None, device: str = "auto", batch_size: int = 8,
              **targets) -> list[Explanation]:
    """Relevancy maps (Chefer et al., or a baseline `method`) of each image.

    Args:
        images: paths or PIL images.
        targets: what to explain, as the model's task takes it — `texts=[...]` (CLIP), `targets=[...]`
            (classifiers; default the predicted classes), `questions=[...]` and `answer=` (VQA),
            `threshold=` (DETR); also `start_layer=`, `precision=`, `features=`, `dictionary=` (see
            `xattn relevancy`).
    Returns:
        One `Explanation` per image, with `.maps` (K, H, W) in [0, 1] and `.scores`.
    """
    from xattn_cli.explainers import build_relevancy

    adapter = load_model(model, pretrained, device)
    return _explain(build_relevancy(adapter, method=method, **targets), images, batch_size)


def mask(images: Sequence[str | Path | Image.Image], *, model: str = "shapes-vit", targets: Sequence[str] = (),
         texts: Sequence[str] = (), keep_ratio: float = 0.25, steps: int = 100, seed: int = 0,
         pretrained: str | None = None, device: str = "auto", batch_size: int = 8) -> list[Explanation]:
    """Learned token masks: per image and target, the round(keep_ratio × patches) patches that alone keep the
    model's decision (see `xattn mask`).

    Args:
        images: paths or PIL images.
        targets: classifiers: labels or indices (default the predicted classes); texts: CLIP models.
        seed: the Gumbel noise seed; an item's noise depends on its content and target, not its batch.
    Returns:
        One `Explanation` per image, with `.maps` (K, H, W) binary (1 = kept) and `.scores`; each target's
        `extra` holds kept, kept_threshold, kept_tokens, score_kept, score_removed, steps and seed.
    """
    explainer = build_explainer("mask", model=model, pretrained=pretrained, device=device, texts=texts,
                                targets=targets, keep_ratio=keep_ratio, steps=steps, seed=seed)
    return _explain(explainer, images, batch_size)
