"""Shared fixtures: tiny random models of the real architectures, and drawn scenes."""
from __future__ import annotations

import os

import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ["XATTN_CACHE_DIR"] = tempfile.mkdtemp(prefix="xattn-test-cache-")  # never the user's cache

import pytest

from helpers import TINY_RN, TINY_VIT, tiny_openclip  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: thread fan-out only costs time (and competes with background jobs)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


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
