"""xattn: explain attention models from the command line or Python.

    >>> from xattn_cli import load_model, surgery
    >>> results = surgery(["scene.png"], ["a red circle", "a blue star"], model="shapes-clip")
    >>> results[0].maps.shape, results[0].scores

Importing this package is cheap: torch loads only when a model or method is used.
"""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__", "load_model", "surgery"]


def __getattr__(name: str):
    if name in ("load_model", "surgery"):
        from xattn_cli import api

        return getattr(api, name)
    raise AttributeError(f"module 'xattn_cli' has no attribute {name!r}")
