"""Model registry: names → loaders (timm-style). Importing this module does not import torch.

Names are either registered (`shapes-clip`, the alias `clip`, ...) or prefixed: `openclip:ARCH` with
`--pretrained TAG|PATH`, and `hf:DIR_OR_REPO`.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable

from xattn_cli.errors import UsageError
from xattn_cli.methods import method_names
from xattn_cli.models.layout import LAYOUTS, Layout


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # a key of `layout.LAYOUTS`, or "auto": known once the folder is read (hf:)
    description: str
    loader: Callable[..., Any]  # ([argument,] pretrained, *, trust_checkpoint) -> adapter
    bundled: bool = False
    weights: str | None = None  # bundled weights, named as configs name data ("assets/...")
    prefix: bool = False  # `name:ARGUMENT` forms, e.g. openclip:ViT-B-16

    @property
    def layout(self) -> Layout | None:
        return LAYOUTS.get(self.family)

    @property
    def methods(self) -> tuple[str, ...]:
        """The registered methods that apply (for "auto" families: every method, decided once loaded)."""
        layout = self.layout
        if layout is None:
            return tuple(method_names())
        return tuple(name for explainer in layout.explainers for name in method_names(explainer, layout.rule))

    @property
    def display_name(self) -> str:
        return f"{self.name}:..." if self.prefix else self.name

    def weights_available(self) -> bool:
        if self.weights is None:
            return not self.bundled
        from xattn_cli.config import data_path

        return data_path(self.weights).is_file()


_MODELS: dict[str, ModelSpec] = {}
_PREFIXES: dict[str, ModelSpec] = {}


def register_model(name: str, family: str, description: str, *,
                   bundled: bool = False, weights: str | None = None, prefix: bool = False):
    """Decorator: register `loader` under `name` (or under the prefix `name:` when `prefix`)."""

    def decorate(loader: Callable[..., Any]) -> Callable[..., Any]:
        table = _PREFIXES if prefix else _MODELS
        if name in table:
            warnings.warn(f"model {name!r} registered twice; the later one wins", stacklevel=2)
        table[name] = ModelSpec(name, family, description, loader, bundled, weights, prefix)
        return loader

    return decorate


def _ensure_loaded() -> None:
    from xattn_cli.models import bundled, zoo  # noqa: F401  (they register on import)


def list_models() -> list[ModelSpec]:
    _ensure_loaded()
    return list(_MODELS.values()) + [spec for spec in _PREFIXES.values()]


def resolve(name: str) -> tuple[ModelSpec, str | None]:
    """The spec for `name` and the argument after a prefix (`openclip:ViT-B-16` → 'ViT-B-16')."""
    _ensure_loaded()
    if name in _MODELS:
        return _MODELS[name], None
    prefix, _, rest = name.partition(":")
    if rest and prefix in _PREFIXES:
        return _PREFIXES[prefix], rest
    known = ", ".join(sorted(_MODELS)) + ", " + ", ".join(f"{p}:..." for p in sorted(_PREFIXES))
    raise UsageError(f"unknown model {name!r} (known: {known}; see `xattn models`)")


def load_model(name: str, pretrained: str | None = None, device: str = "cpu", *,
               trust_checkpoint: bool = False) -> Any:
    """Build the adapter for `name` on `device`. Raises UsageError with a one-line reason.

    `trust_checkpoint` allows pickle checkpoints that are more than plain tensors (they can run code).
    """
    from xattn_cli.device import flush_denormals

    spec, argument = resolve(name)
    arguments = (pretrained,) if argument is None else (argument, pretrained)
    adapter = spec.loader(*arguments, trust_checkpoint=trust_checkpoint).to(device)
    flush_denormals()  # tiny models hit denormals on the CPU; large ones lose nothing by it
    return adapter
