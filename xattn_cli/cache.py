"""On-disk cache of text embeddings, so an 85-template ensemble is encoded once per model, not per run.

One safetensors file per text tower (named by a hash of its weights) maps each prompt set to its (E,)
embedding. A prompt set is keyed by the token ids of all its templated prompts, which covers the text,
the templates and the tokenizer at once. The cache is an optimisation only: a missing, unreadable or
unwritable cache never fails a run.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable

import torch

from xattn_cli.io.outputs import atomic_write_bytes

CACHE_FORMAT = 1
"""Part of every cache file's name: raise it when how an entry is computed changes (the ensemble's averaging)."""


def cache_root() -> Path | None:
    """`$XATTN_CACHE_DIR`, else `$XDG_CACHE_HOME/xattn`, else `~/.cache/xattn`; None when XATTN_CACHE_DIR is ''."""
    configured = os.environ.get("XATTN_CACHE_DIR")
    if configured is not None:
        return Path(configured) if configured else None
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "xattn"


def tensor_fingerprint(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 of names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(named_tensors, key=lambda item: item[0]):
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)};".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())  # (numel · itemsize,)
    return digest.hexdigest()


def prompt_key(token_ids: torch.Tensor) -> str:
    """Key of one prompt set: a hash of its (T, L) token ids."""
    ids = token_ids.detach().to("cpu", torch.int64).contiguous()
    return hashlib.sha256(f"{tuple(ids.shape)}".encode() + ids.numpy().tobytes()).hexdigest()[:40]


class TextEmbeddingCache:
    """Embeddings of one text tower, loaded once and written back (atomically) when new ones appear."""

    def __init__(self, root: Path | None, model_fingerprint: str):
        name = f"{model_fingerprint[:32]}-v{CACHE_FORMAT}.safetensors"
        self.path = root / "text-embeddings" / name if root else None
        self.entries = self._read()

    def _read(self) -> dict[str, torch.Tensor]:
        if self.path is None or not self.path.is_file():
            return {}
        from safetensors.torch import load

        try:
            return load(self.path.read_bytes())
        except Exception:  # a corrupt or foreign file is recomputed, then overwritten
            return {}

    def get(self, key: str) -> torch.Tensor | None:
        return self.entries.get(key)

    def put(self, new_entries: dict[str, torch.Tensor]) -> None:
        self.entries.update({key: value.detach().to("cpu", torch.float32).contiguous()
                             for key, value in new_entries.items()})
        if self.path is None:
            return
        from safetensors.torch import save

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.path, save(self.entries))
        except OSError:
            pass  # read-only or full cache folder: the run goes on without caching
