"""Model configuration files in `configs/` and the paths they name (relative to the project root)."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = PROJECT_ROOT / "configs"


@lru_cache(maxsize=None)
def load_config(name: str) -> dict:
    """The JSON config `configs/<name>.json` (KeyError if there is none)."""
    path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        raise KeyError(name)
    return json.loads(path.read_text(encoding="utf-8"))


def list_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def project_path(relative: str) -> Path:
    return PROJECT_ROOT / relative
