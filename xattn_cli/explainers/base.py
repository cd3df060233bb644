"""The explainer layer: an adapter (models/) + a method (methods/) + targets → one `TargetMap` per target.

Every explainer shares `Explainer`: the method's spec from the registry, the precision check, and the
record → rule → map loop's pieces — `recording` (gradients from where the method needs them + the
attention recorder), `backward`, and `image_map` (`tensors.to_image` at each image's size).
May import: models, methods, capture, tensors, device, errors, results, text. Never io, eval, render or cli.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
from PIL import Image

from xattn_cli.capture import AttentionRecorder, Recording
from xattn_cli.capture.gradients import first_gradient_sites, gradients_from, input_gradients_only
from xattn_cli.device import autocast
from xattn_cli.errors import ItemError, UsageError
from xattn_cli.methods import method_spec
from xattn_cli.results import TargetMap
from xattn_cli.tensors import to_image


class Explainer:
    """Maps of one adapter under one method. Subclasses implement `explain`."""

    def __init__(self, adapter, method: str, precision: str = "fp32"):
        self.spec = method_spec(method, None if method == "surgery" else adapter.layout.rule, adapter.name)
        autocast(str(adapter.device), precision)  # an unusable precision is a usage error, before any image
        self.adapter, self.method, self.precision, self.model_name = adapter, method, precision, adapter.name

    def meta(self) -> dict[str, Any]:
        """Run-level facts for each record's `meta` (precision, start layer, templates, ...)."""
        return {"precision": self.precision}

    def explain(self, images: Sequence[Image.Image], names: Sequence[str]) -> list[list[TargetMap]]:
        """One list of targets per image, maps at each image's own size; `names` are the images' paths."""
        raise NotImplementedError

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(str(self.adapter.device), self.precision)

    @contextlib.contextmanager
    def recording(self, start_layers: dict[str, int] | None = None,
                  batch_size: int | None = None) -> Iterator[Recording]:
        """Attention recorded for one forward pass, with gradients where the method reads them.

        Gradient-free methods run under no_grad. Gradient methods freeze the parameters; with `start_layers`
        (stream → first layer the rule accumulates) the graph starts at the first attention block the method
        reads in each stream, else at the inputs. `batch_size` widens batch-1 inputs there.
        """
        model, sites = self.adapter.model, self.adapter.attention_sites()
        if not self.spec.needs_gradients:
            gradients = torch.no_grad()
        elif start_layers is None:
            gradients = input_gradients_only(model)
        else:
            starts = first_gradient_sites(sites, start_layers, self.spec.last_layer_only)
            gradients = gradients_from(model, starts, batch_size)
        with gradients, AttentionRecorder(sites) as recording:
            yield recording

    def backward(self, score: torch.Tensor, retain: bool) -> None:
        """Gradients of `score` into the recorded attention (nothing for gradient-free methods)."""
        if self.spec.needs_gradients and score.requires_grad:
            score.backward(retain_graph=retain)

    @staticmethod
    def image_map(relevance: torch.Tensor, image: Image.Image, **where) -> tuple[Any, bool]:
        """(N,) token or region relevance → an (H, W) float32 numpy map of `image`, and its degenerate flag.
        `where`: `grid=` for patches or `boxes=` for regions (see `tensors.to_image`)."""
        heat, degenerate = to_image(relevance, (image.height, image.width), **where)
        return heat.cpu().numpy(), bool(degenerate)


def check_finite(values: torch.Tensor, what: str = "logits") -> None:
    if not torch.isfinite(values).all():
        raise ItemError("NonFiniteOutput", f"the model produced non-finite {what}")


def checked_texts(texts: Sequence[str], what: str = "text") -> list[str]:
    """Stripped texts (or questions); none, or an empty one, is a usage error."""
    texts = [text.strip() for text in texts]
    if not texts or not all(texts):
        raise UsageError(f"give at least one {what}, and no empty {what}")
    return texts
