"""xattn: explain attention models from the command line or Python.

    >>> from xattn_cli import load_model, surgery
    >>> results = surgery(["scene.png"], ["a red circle", "a blue star"], model="shapes-clip")
    >>> results[0].maps.shape, results[0].scores
    >>> relevancy(["scene.png"], model="shapes-vit", method="chefer")[0].targets
    >>> mask(["scene.png"], model="shapes-vit", keep_ratio=0.25)[0].targets[0].extra["kept_tokens"]

Packages, and what each may import (tests/test_imports.py holds them to it):
    errors, tensors, device, results, text, cache, config  leaves: no other package
    capture    hooks on model internals (attention probabilities, gradient starts) → tensors
    methods    pure maths on recorded tensors and the method registry → capture, tensors
    models     adapters and loaders; the only place that knows model families → capture, methods, tensors
    explainers adapter + method + targets → maps → models, methods, capture
    io         inputs, decoding, atomic outputs; render: overlays, reports; eval: benchmarks
    runner, api  the batch loop and the Python entry points; cli: the Typer commands (no maths)
    world, train  the procedural shapes world and the recipes of the bundled models

Importing this package is cheap: torch loads only when a model or method is used.
"""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__", "load_model", "mask", "relevancy", "surgery"]


def __getattr__(name: str):
    if name in ("load_model", "mask", "relevancy", "surgery"):
        from xattn_cli import api

        return getattr(api, name)
    raise AttributeError(f"module 'xattn_cli' has no attribute {name!r}")
