"""Every registered model × every method it lists (timm style): loads offline and gives finite maps in
[0, 1] at the image's size. A new model or method is covered the day it is registered.

Names that download (the public aliases, `openclip:`, `hf:`, `timm:`) are given local weights of their
format: the bundled folders for the HF aliases, small random checkpoints written here for the rest.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from helpers import save_tiny_hf_clip
from xattn_cli.errors import UsageError
from xattn_cli.methods import METHODS
from xattn_cli.models.registry import list_models, load_model

TINY_OPENCLIP = "xattn-smoke-vit"  # a tiny architecture registered with open_clip for `openclip:`
FULL_SIZE_CLIP = "ViT-B-16"  # the `clip` alias: built at full size, random weights from a file


def _cases() -> list[tuple[str, str]]:
    return [(spec.name, method) for spec in list_models() for method in spec.methods]


@functools.lru_cache(maxsize=None)
def _local(name: str, folder: str) -> tuple[str, str | None]:
    """(model name to load, --pretrained) for `name`, offline."""
    from pathlib import Path

    import open_clip
    from safetensors.torch import save_file

    root = Path(folder)
    if name == "clip":  # a checkpoint file of the alias's architecture
        path = root / "clip.safetensors"
        if not path.exists():
            torch.manual_seed(0)
            model = open_clip.create_model(FULL_SIZE_CLIP, pretrained=None)
            save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, str(path))
        return "clip", str(path)
    if name == "openclip":
        open_clip.factory._MODEL_CONFIGS[TINY_OPENCLIP] = dict(
            embed_dim=32, vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=16),
            text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1))
        return f"openclip:{TINY_OPENCLIP}", None
    if name == "hf":
        path = root / "hf-clip"
        if not path.exists():
            save_tiny_hf_clip(path)
        return f"hf:{path}", None
    if name == "timm":
        return "timm:vit_tiny_patch16_224", None
    if name == "vit":  # a save_pretrained ViT classifier folder
        import transformers

        path = root / "hf-vit"
        if not path.exists():
            config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=2, num_labels=3)
            torch.manual_seed(0)
            transformers.ViTForImageClassification(config).save_pretrained(path)
        return "vit", str(path)
    if name in ("lxmert", "visualbert", "detr"):  # the bundled folder of the same format
        from xattn_cli.config import data_path

        bundled = next(spec for spec in list_models() if spec.name == f"shapes-{name}")
        return name, str(data_path(bundled.weights).parent)
    return name, None  # bundled


@functools.lru_cache(maxsize=1)  # the methods of one model run one after another: load it once
def _loaded(name: str, pretrained: str | None):
    return load_model(name, pretrained)


@pytest.fixture(scope="module")
def local_folder(tmp_path_factory):
    return str(tmp_path_factory.mktemp("registry-smoke"))


def _targets(adapter, method: str) -> dict:
    task = adapter.layout.task
    if method == "surgery" or task == "image-text":
        return {"texts": ["a red circle", "a blue star"]}
    if task == "vqa":
        return {"questions": ["what colour is the circle?"]}
    if task == "detect":
        return {"threshold": 0.0}
    return {"targets": [adapter.labels[0]]}


def _explainer(adapter, method: str, **targets):
    from xattn_cli.explainers import build_relevancy
    from xattn_cli.explainers.surgery import SurgeryExplainer

    if method == "surgery":  # no 85-template ensemble: a smoke test, and the full-size alias's text tower is slow
        return SurgeryExplainer(adapter, targets["texts"], ensemble=False, text_cache=False)
    if METHODS[method].explainer == "mask":  # two optimisation steps: the mechanics, not the mask's quality
        from xattn_cli.explainers.mask import MaskExplainer
        from xattn_cli.methods.token_mask import MaskSettings

        return MaskExplainer(adapter, targets=targets.get("targets", ()), texts=targets.get("texts", ()),
                             settings=MaskSettings(steps=2))
    return build_relevancy(adapter, method=method, **targets)


@pytest.mark.slow
@pytest.mark.parametrize("name, method", _cases())
def test_every_registered_model_explains_with_every_listed_method(name, method, local_folder):
    from xattn_cli.world.shapes import scene_at

    image = scene_at(9, 0, size=64).image.resize((72, 56))
    adapter = _loaded(*_local(name, local_folder))
    explainer = _explainer(adapter, method, **_targets(adapter, method))
    targets = explainer.explain([image], [f"{name}.png"])[0]
    assert targets, f"{name} × {method}: no target explained"
    for target in targets[:3]:
        assert target.map.shape == (56, 72) and target.map.dtype == np.float32
        assert np.isfinite(target.map).all() and 0.0 <= target.map.min() and target.map.max() <= 1.0
        assert target.degenerate or target.map.max() > 0.5  # min-max scaled (surgery: before upsampling)


@pytest.mark.parametrize("name", [spec.name for spec in list_models() if spec.bundled])
def test_methods_a_model_does_not_list_are_refused(name):
    """The registry's method list is the truth: every other method is a one-line usage error."""
    adapter = load_model(name)
    spec = next(spec for spec in list_models() if spec.name == name)
    refused = [method for method in METHODS if method not in spec.methods]
    for method in refused:
        with pytest.raises(UsageError):
            _explainer(adapter, method, **_targets(adapter, method))
