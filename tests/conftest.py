"""Shared fixtures: tiny random models of the real architectures, and drawn scenes."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub

import pytest
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


@pytest.fixture
def vit_adapter():
    return tiny_openclip(TINY_VIT)


@pytest.fixture
def rn_adapter():
    return tiny_openclip(TINY_RN)


@pytest.fixture
def scene_images():
    from xattn_cli.world.shapes import scene_at

    return [scene_at(5, i, size=48, n_objects=1 + i % 3).image for i in range(8)]
