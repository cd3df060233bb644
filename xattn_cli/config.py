"""Model configuration files and the bundled data they name, read as package data.

`configs/` and `assets/{weights,models}/` sit at the repository root and ship inside the package as
`xattn_cli._configs` and `xattn_cli._assets` (pyproject.toml maps the folders, setup.py lists the packages),
so an editable install reads the source tree and a wheel install reads site-packages, both through
`data_path`. Configs name their data relative to the repository root ("assets/weights/shapes-clip.safetensors").
"""
from __future__ import annotations

import json
from functools import lru_cache
from importlib.resources import files
from pathlib import Path

FOLDER_PACKAGES = {"configs": "xattn_cli._configs", "assets": "xattn_cli._assets"}


def data_path(relative: str) -> Path:
    """The installed file or folder that `relative` ("configs/...", "assets/...") names."""
    top, _, rest = relative.partition("/")
    if top not in FOLDER_PACKAGES:
        raise KeyError(f"{relative!r} is not under {' or '.join(FOLDER_PACKAGES)}/")
    return Path(str(files(FOLDER_PACKAGES[top]))) / rest  # installs are unpacked folders, never zips


project_path = data_path  # the earlier name, still imported by tests and train/
CONFIG_DIR = data_path("configs")


@lru_cache(maxsize=None)
def load_config(name: str) -> dict:
    """The JSON config `configs/<name>.json` (KeyError if there is none)."""
    path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        raise KeyError(name)
    return json.loads(path.read_text(encoding="utf-8"))
