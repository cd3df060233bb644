"""Typed results of an explanation: what the library returns and the CLI writes."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np


def token_relevances(words: Sequence[str], relevance: Sequence[float]) -> list[dict[str, Any]]:
    """The "tokens" of a target, one rule for every model: each shown token's relevance divided by the largest
    among them, so the most relevant token is 1 and a token with none is 0 (all 0 when no token has any)."""
    values = np.clip(np.asarray(relevance, dtype=np.float64), 0, None)
    top = float(values.max()) if values.size else 0.0
    scaled = values / top if top > 0 else np.zeros_like(values)
    return [{"token": word, "relevance": round(float(value), 6)} for word, value in zip(words, scaled)]


@dataclass
class TargetMap:
    """One explained target of one image."""

    target: str
    score: float
    map: np.ndarray  # (H, W) float32 in [0, 1], at the original image size
    degenerate: bool = False  # the raw map was constant or non-finite; `map` is then zeros
    extra: dict[str, Any] = field(default_factory=dict)  # method-specific JSON fields (points, tokens, ...)

    @property
    def peak(self) -> list[int]:
        """[x, y] of the map's maximum, in original-image pixels."""
        row, col = np.unravel_index(int(np.argmax(self.map)), self.map.shape)
        return [int(col), int(row)]

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "score": round(float(self.score), 6), "peak": self.peak,
                "degenerate": self.degenerate, **self.extra}


@dataclass
class Explanation:
    """All targets of one image."""

    image: str
    size: tuple[int, int]  # (W, H) of the original image
    targets: list[TargetMap]

    @property
    def maps(self) -> np.ndarray:
        return np.stack([t.map for t in self.targets])  # (K, H, W)

    @property
    def scores(self) -> list[float]:
        return [t.score for t in self.targets]

    def to_json(self) -> dict[str, Any]:
        return {"image": self.image, "size": list(self.size), "targets": [t.to_json() for t in self.targets]}
