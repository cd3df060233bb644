"""Prompt templates and the word-level tokenizer of the bundled CLIP models.

The 85 templates of CLIP Surgery are the 80 OpenAI ImageNet templates plus five scene templates
(reference/clip-surgery.md §3.1). The bundled models use a small word vocabulary instead of CLIP's
49k BPE table; the text transformer is the unchanged open_clip one, so the end-of-text token has the
largest id (open_clip pools the text at `argmax(token ids)`).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

SCENE_TEMPLATES = (
    "there is a {} in the scene.", "there is the {} in the scene.", "this is a {} in the scene.",
    "this is the {} in the scene.", "this is one {} in the scene.",
)


def ensemble_templates() -> list[str]:
    """The 85 templates, as format strings with one `{}`."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return [template("{}") for template in OPENAI_IMAGENET_TEMPLATES] + list(SCENE_TEMPLATES)


_WORD = re.compile(r"[a-z]+|[0-9]+|[^\sa-z0-9]")
SPECIALS = ("<pad>", "<unk>", "<start>")
END = "<end>"


class WordTokenizer:
    """Lower-cased words and punctuation → ids; `<pad>` = 0, `<end>` = the largest id."""

    def __init__(self, words: list[str], context_length: int = 32):
        self.vocab = list(SPECIALS) + [w for w in words if w not in SPECIALS and w != END] + [END]
        self.ids = {word: i for i, word in enumerate(self.vocab)}
        self.context_length = context_length

    @classmethod
    def from_file(cls, path: str | Path, context_length: int = 32) -> "WordTokenizer":
        return cls(Path(path).read_text(encoding="utf-8").split("\n"), context_length)

    def save(self, path: str | Path) -> None:
        Path(path).write_text("\n".join(self.vocab[len(SPECIALS):-1]), encoding="utf-8")

    def words(self, text: str) -> list[str]:
        return _WORD.findall(text.lower())

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else texts
        tokens = torch.zeros(len(texts), self.context_length, dtype=torch.long)  # (K, ctx)
        unk, start, end = self.ids["<unk>"], self.ids["<start>"], self.ids[END]
        for row, text in enumerate(texts):
            ids = [self.ids.get(w, unk) for w in self.words(text)][: self.context_length - 2]
            tokens[row, : len(ids) + 2] = torch.tensor([start, *ids, end])
        return tokens

    def decode(self, ids: torch.Tensor) -> list[str]:
        """Word of each non-padding id of one row (for token relevance output)."""
        return [self.vocab[i] for i in ids.tolist() if i != 0]


def build_vocabulary(extra_texts: list[str]) -> list[str]:
    """Every word of the 85 templates and of `extra_texts`, sorted (deterministic)."""
    tokenizer = WordTokenizer([])
    words = set()
    for text in ensemble_templates() + extra_texts:
        words.update(tokenizer.words(text.replace("{}", " ")))
    return sorted(words)
