"""Tiny random models of the real architectures, shared by the tests (import as `from helpers import ...`)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_VIT = dict(embed_dim=32, vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=4, head_width=16),
                text_cfg=dict(context_length=16, vocab_size=100, width=32, heads=2, layers=1))
TINY_RN = dict(embed_dim=32, vision_cfg=dict(image_size=64, layers=[1, 1, 1, 1], width=16, head_width=8),
               text_cfg=dict(context_length=16, vocab_size=100, width=32, heads=2, layers=1))


class CharTokenizer:
    """Letters → ids 1..26, end-of-text = 99 (the largest id, where open_clip pools)."""

    def __call__(self, texts):
        tokens = torch.zeros(len(texts), 16, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [ord(c) - 96 for c in text.lower() if c.isalpha()][:14]
            tokens[row, : len(ids) + 1] = torch.tensor(ids + [99])
        return tokens


def tiny_openclip(arch: dict, seed: int = 0):
    from open_clip.model import CLIP

    from xattn_cli.models.openclip import OpenClipAdapter

    torch.manual_seed(seed)
    model = CLIP(embed_dim=arch["embed_dim"], vision_cfg=arch["vision_cfg"], text_cfg=arch["text_cfg"]).eval()
    return OpenClipAdapter(model, CharTokenizer(), name="tiny")


def save_tiny_hf_clip(folder: Path):
    """A tiny random CLIPModel with a letter-level BPE tokenizer, saved like `save_pretrained` does."""
    import transformers

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in letters:
        vocab[letter] = len(vocab)
        vocab[letter + "</w>"] = len(vocab)
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=32, eos_token_id=1, bos_token_id=0,
                         pad_token_id=1),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=3, num_attention_heads=2),
        projection_dim=16)
    torch.manual_seed(2)
    model = transformers.CLIPModel(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def assert_batch_equals_single_runs(explainer, images, atol: float = 1e-5) -> None:
    """Each image's targets, scores, maps (and token/region relevances) from one batch equal its own run's."""
    import numpy as np
    import pytest

    for image, together in zip(images, explainer.explain(images)):
        (alone,) = explainer.explain([image])
        assert [t.target for t in together] == [t.target for t in alone]
        for a, b in zip(together, alone):
            assert a.score == pytest.approx(b.score, abs=1e-5)
            np.testing.assert_allclose(a.map, b.map, atol=atol, rtol=0)
            for key in ("tokens", "regions"):
                if key in a.extra:
                    np.testing.assert_allclose([t["relevance"] for t in a.extra[key]],
                                               [t["relevance"] for t in b.extra[key]], atol=1e-5)


def load_benchmark(name: str):
    """The module `benchmarks/<name>.py` (not a package: loaded by path), registered under `name`; its folder is
    on the path, as when the script runs there (it may import a sibling such as `_report`)."""
    import importlib.util
    import sys

    folder = Path(__file__).resolve().parent.parent / "benchmarks"
    if str(folder) not in sys.path:
        sys.path.append(str(folder))
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module
