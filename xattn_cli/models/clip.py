"""What every CLIP adapter shares: preprocessing, text embeddings, and the surgery entry point."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from xattn_cli.cache import TextEmbeddingCache, cache_root, prompt_key, tensor_fingerprint
from xattn_cli.methods.surgery import text_ensemble
from xattn_cli.models.base import Adapter
from xattn_cli.models.layout import LAYOUTS
from xattn_cli.text import ensemble_templates

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipAdapter(Adapter):
    """A CLIP model seen through the operations the explanation methods need.

    Subclasses supply tokenising and encoding, `surgery_and_embedding`, attention sites, `patch_size`
    and `native_size`; this class handles prompts.
    """

    family = "clip"
    layout = LAYOUTS["clip"]
    name: str
    native_size: tuple[int, int]  # (H, W) the model was trained at
    default_surgery_blocks: int = 6
    default_surgery_size: tuple[int, int] | None = None
    mean: Sequence[float] = CLIP_MEAN
    std: Sequence[float] = CLIP_STD
    vision_prefixes: tuple[str, ...] = ()  # state_dict names of the image tower, left out of the text cache key

    def __init__(self, model: torch.nn.Module):
        super().__init__(model)
        self._text_cache: dict[tuple[str, bool], torch.Tensor] = {}
        self._disk: tuple[Path, TextEmbeddingCache] | None = None

    def grid(self, size: tuple[int, int]) -> tuple[int, int]:
        """Patch grid (gh, gw) of an input of (H, W) pixels."""
        return size[0] // self.patch_size[0], size[1] // self.patch_size[1]

    @torch.inference_mode()
    def text_embeddings(self, texts: Sequence[str], ensemble: bool = True, *, disk_cache: bool = True) -> torch.Tensor:
        """(K, E) normalised embeddings: the 85-template ensemble, or the raw texts.

        An ensemble costs 85 text forwards per text, so each one is encoded once per adapter and, with
        `disk_cache`, once per text tower across runs (`xattn_cli.cache`).
        """
        cache = self._text_cache
        missing = [text for text in dict.fromkeys(texts) if (text, ensemble) not in cache]
        if missing:
            templates = ensemble_templates() if ensemble else ["{}"]
            stored = self._disk_cache() if disk_cache else None
            keys = {text: prompt_key(self.tokenize([template.format(text) for template in templates])["input_ids"])
                    for text in missing} if stored else {}
            for text in missing:
                hit = stored.get(keys[text]) if stored else None
                if hit is not None:
                    cache[(text, ensemble)] = hit.to(self.device)
            to_encode = [text for text in missing if (text, ensemble) not in cache]
            if to_encode:
                for text, embedding in zip(to_encode, text_ensemble(self.encode_text, to_encode, templates)):
                    cache[(text, ensemble)] = embedding
                if stored:
                    stored.put({keys[text]: cache[(text, ensemble)] for text in to_encode})
        return torch.stack([cache[(text, ensemble)] for text in texts])  # (K, E)

    def _disk_cache(self) -> TextEmbeddingCache | None:
        root = cache_root()
        if root is None:
            return None
        if self._disk is None or self._disk[0] != root:
            text_tower = ((name, tensor) for name, tensor in self.model.state_dict().items()
                          if not name.startswith(self.vision_prefixes))
            self._disk = (root, TextEmbeddingCache(root, tensor_fingerprint(text_tower)))
        return self._disk[1]

    # Subclass API -------------------------------------------------------------------------------
    patch_size: tuple[int, int]

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """(K, E) text embeddings, not normalised."""
        return self.encode_tokens(self.tokenize(texts))

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Model inputs for the text tower; always holds "input_ids" (K, L)."""
        raise NotImplementedError

    def encode_tokens(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def pooled_index(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(K,) position of the token each text embedding is read from (end of text)."""
        raise NotImplementedError

    def token_words(self, batch: dict[str, torch.Tensor], row: int) -> list[str]:
        """The token strings of one row, position by position."""
        raise NotImplementedError

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, E) image embeddings at the native input size, not normalised."""
        raise NotImplementedError

    def attention_sites(self) -> list:
        """`AttentionSite`s of the vision tower (stream "vision") and the text tower ("text")."""
        raise NotImplementedError

    @property
    def surgery_depth(self) -> int | None:
        """How many blocks the v-v path can cover (None: a ResNet, whose attention pool is the only one)."""
        raise NotImplementedError

    def surgery_features(self, pixels: torch.Tensor, blocks: int | None = None) -> torch.Tensor:
        """(B, 1 + N, E) tokens after architecture surgery, projected, not normalised."""
        return self.surgery_and_embedding(pixels, blocks)[0]

    def surgery_and_embedding(self, pixels: torch.Tensor,
                              blocks: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Surgery tokens (B, 1 + N, E) and the model's own image embedding (B, E), in one pass."""
        raise NotImplementedError

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp())
