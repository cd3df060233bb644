"""LXMERT, VisualBERT, DETR and CrossAttention models: the recorder leaves them as they were (also when an
exception escapes), recording does not change what they compute, and `hf:DIR` loads each family from a
`save_pretrained` folder and explains it exactly like the model that was saved."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from test_coattention_reference import (DETR_SIZE, GRID, CELL, QUESTIONS, WORDS, _CoAttentionVqa, _adapter,
                                        _detr_model, _images, _perturb, _regions, tokenizer)  # noqa: F401 (fixture)
from test_relevancy_reference import _global_hook_counts

FAMILIES = [("lxmert", None), ("visualbert", None), ("detr", None), ("detr", "eager"), ("coattention", None)]


class _CoAttentionAdapter:
    """Just enough of an adapter for the recorder tests."""

    def __init__(self):
        torch.manual_seed(7)
        self.model = _perturb(_CoAttentionVqa(len(WORDS), 3 * CELL * CELL), 70, scale=0.3)

    def attention_sites(self):
        return self.model.sites()


def _make(family, attn, tokenizer):
    if family == "coattention":
        return _CoAttentionAdapter()
    adapter = _adapter(family, tokenizer)
    if attn is not None:
        adapter.model.set_attn_implementation(attn)
    elif family == "detr":
        assert adapter.model.config._attn_implementation == "sdpa"  # the recorder must switch it
    return adapter


def _run(family, adapter, tokenizer, images, grad: bool = False):
    """The model's output on a fixed input (features/pixels require grad when asked)."""
    if family == "detr":
        from test_coattention_reference import _detr_pixels

        return adapter.detect(_detr_pixels(images).requires_grad_(grad))[0]
    tokens = tokenizer(QUESTIONS[: len(images)], padding=True, return_tensors="pt")
    regions = _regions(images)
    regions.features.requires_grad_(grad)
    if family == "coattention":
        return adapter.model(tokens["input_ids"], tokens["attention_mask"], regions.features, regions.mask)[0]
    return adapter.answer_logits(dict(tokens), regions)


def _explain(family, adapter, images):
    from xattn_cli.explainers.detection import DetectionRelevancy
    from xattn_cli.explainers.vqa import VqaRelevancy

    if family == "detr":
        return DetectionRelevancy(adapter, threshold=0.25).explain(images)
    return VqaRelevancy(adapter, QUESTIONS[:2]).explain(images)


def _implementations(model):
    return {name: module.config._attn_implementation for name, module in model.named_modules()
            if hasattr(getattr(module, "config", None), "_attn_implementation")}


def _snapshot(model):
    params = dict(model.named_parameters())
    for j, name in enumerate(sorted(params)):  # a mix of frozen and trainable parameters
        params[name].requires_grad_(j % 3 != 0)
    return {"modules": dict(model.named_modules()),
            "requires_grad": {n: p.requires_grad for n, p in params.items()},
            "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "training": {n: m.training for n, m in model.named_modules()},
            "globals": _global_hook_counts(), "grad_enabled": torch.is_grad_enabled(),
            "implementations": _implementations(model)}


def _assert_restored(model, snap):
    for name, module in model.named_modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, f"hook left on {name}"
        assert not module._backward_hooks and not getattr(module, "_backward_pre_hooks", None), f"hook left on {name}"
        assert "forward" not in vars(module), f"forward patched on {name}"
        assert module is snap["modules"][name] and module.training == snap["training"][name]
    assert dict(model.named_modules()).keys() == snap["modules"].keys()
    for name, p in model.named_parameters():
        assert p.requires_grad == snap["requires_grad"][name], f"requires_grad of {name} changed"
        assert p.grad is None, f"{name}.grad was left set"
    for key, value in snap["state"].items():
        assert torch.equal(model.state_dict()[key], value), f"{key} changed"
    assert _global_hook_counts() == snap["globals"]
    assert torch.is_grad_enabled() == snap["grad_enabled"]
    assert _implementations(model) == snap["implementations"]


class _Boom(RuntimeError):
    pass


def _last_module(family, model):
    if family == "coattention":
        return model.head
    if family == "detr":
        return model.model.decoder.layernorm
    return model.lxmert.pooler if family == "lxmert" else model.cls


@pytest.mark.parametrize("family,attn", FAMILIES)
def test_recording_does_not_change_the_forward_and_records_every_site(tokenizer, family, attn):
    from xattn_cli.capture import AttentionRecorder

    adapter = _make(family, attn, tokenizer)
    images = _images()[:2]
    with torch.no_grad():
        before = _run(family, adapter, tokenizer, images)
    sites = adapter.attention_sites()
    with AttentionRecorder(sites) as recording:
        inside = _run(family, adapter, tokenizer, images, grad=True)
        inside.sum().backward()
    torch.testing.assert_close(inside.detach(), before, rtol=1e-5, atol=1e-6)
    assert sorted((e.kind, e.stream, e.layer) for e in recording.events) == \
        sorted((s.kind, s.stream, s.layer) for s in sites), "one event per site and forward"
    for event in recording.events:
        assert event.probs.shape[0] == 2 and event.probs.dim() == 4
        torch.testing.assert_close(event.probs.sum(-1)[event.probs.sum(-1) > 0],
                                   torch.ones_like(event.probs.sum(-1)[event.probs.sum(-1) > 0]))


@pytest.mark.parametrize("family,attn", FAMILIES[:-1])
def test_explain_leaves_model_as_it_was(tokenizer, family, attn):
    adapter = _make(family, attn, tokenizer)
    snap = _snapshot(adapter.model)
    images = _images()
    with torch.no_grad():
        before = _run(family, adapter, tokenizer, images)
    results = _explain(family, adapter, images)
    assert any(results)
    _assert_restored(adapter.model, snap)
    with torch.no_grad():
        assert torch.equal(_run(family, adapter, tokenizer, images), before)


@pytest.mark.parametrize("family,attn", FAMILIES)
def test_recorder_restores_and_propagates_on_error(tokenizer, family, attn):
    from xattn_cli.capture import AttentionRecorder

    adapter = _make(family, attn, tokenizer)
    snap = _snapshot(adapter.model)
    images = _images()[:2]

    def explode(*_):
        raise _Boom("inside forward")

    handle = _last_module(family, adapter.model).register_forward_hook(explode)
    try:
        with pytest.raises(_Boom, match="inside forward"):
            with AttentionRecorder(adapter.attention_sites()):
                _run(family, adapter, tokenizer, images, grad=True)
        if family != "coattention":
            with pytest.raises(_Boom, match="inside forward"):
                _explain(family, adapter, images)
    finally:
        handle.remove()
    _assert_restored(adapter.model, snap)
    with pytest.raises(_Boom, match="after forward"):
        with AttentionRecorder(adapter.attention_sites()) as recording:
            _run(family, adapter, tokenizer, images)
            assert recording.events
            raise _Boom("after forward")
    _assert_restored(adapter.model, snap)


# ------------------------------------------------------------------------------------------------
# hf:DIR
# ------------------------------------------------------------------------------------------------


def _save(family, adapter, tokenizer, folder):
    adapter.model.save_pretrained(folder)
    if family == "detr":
        processor = {"size": {"height": DETR_SIZE[0], "width": DETR_SIZE[1]},
                     "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
        (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    else:
        tokenizer.save_pretrained(folder)
        (folder / "xattn.json").write_text(json.dumps({"regions": {"grid": list(GRID), "cell": CELL}}))


@pytest.mark.parametrize("family", ["lxmert", "visualbert", "detr"])
def test_hf_folder_round_trip(tokenizer, tmp_path, family):
    from xattn_cli.models.registry import load_model

    original = _make(family, None, tokenizer)
    folder = tmp_path / family
    _save(family, original, tokenizer, folder)
    loaded = load_model(f"hf:{folder}")
    assert loaded.family == family and loaded.name == f"hf:{folder}"
    for key, value in original.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    if family == "detr":
        assert loaded.native_size == DETR_SIZE and loaded.labels == original.labels
    else:
        assert loaded.answers == original.answers and loaded.regions.grid == GRID
    images = _images()
    expected, got = _explain(family, original, images), _explain(family, loaded, images)
    assert any(got)
    for a_targets, b_targets in zip(expected, got):
        assert [t.to_json() for t in a_targets] == [t.to_json() for t in b_targets]
        for a, b in zip(a_targets, b_targets):
            np.testing.assert_array_equal(a.map, b.map)


def test_hf_region_model_without_regions_asks_for_features(tokenizer, tmp_path):
    from xattn_cli.errors import UsageError
    from xattn_cli.explainers.vqa import VqaRelevancy
    from xattn_cli.models.registry import load_model

    original = _make("lxmert", None, tokenizer)
    original.model.save_pretrained(tmp_path / "lx")
    tokenizer.save_pretrained(tmp_path / "lx")
    loaded = load_model(f"hf:{tmp_path / 'lx'}")
    assert loaded.regions is None
    with pytest.raises(UsageError, match="needs region features"):
        VqaRelevancy(loaded, ["what colour ?"])


def test_hf_detr_folder_without_processor_config(tmp_path):
    """A bare `save_pretrained` folder: DETR's own input size, the backbone from the checkpoint (offline)."""
    from xattn_cli.models.registry import load_model

    model = _detr_model()
    model.save_pretrained(tmp_path / "d")
    loaded = load_model(f"hf:{tmp_path / 'd'}")
    assert loaded.native_size == (800, 800)  # DETR's shortest edge when the folder names no size
    pixels = torch.randn(1, 3, 40, 48)
    with torch.no_grad():
        torch.testing.assert_close(loaded.detect(pixels)[0], model(pixel_values=pixels).logits)
    assert loaded.labels == ["circle", "square", "star", "ring"]
