"""Batches, sizes and side effects of the surgery explainer."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from xattn_cli.errors import UsageError
from xattn_cli.cli.surgery import parse_size
from xattn_cli.explainers.surgery import SurgeryExplainer

TEXTS = ["red circle", "blue star", "green ring"]


def test_batch_of_eight_equals_eight_single_runs(vit_adapter, scene_images):
    explainer = SurgeryExplainer(vit_adapter, TEXTS, ensemble=False)
    batched = explainer.explain(scene_images)
    for image, targets in zip(scene_images, batched):
        single = explainer.explain([image])[0]
        for one, many in zip(single, targets):
            np.testing.assert_allclose(one.map, many.map, atol=1e-5)
            assert one.score == pytest.approx(many.score, abs=1e-5)


def test_resnet_batch_of_eight_equals_eight_single_runs(rn_adapter, scene_images):
    # Compared before min-max: the random tiny ResNet's patch similarities span only ~2e-4, so the
    # normalisation would magnify float32 convolution noise (3e-8) past any fixed map tolerance.
    pixels = rn_adapter.preprocess(scene_images, rn_adapter.native_size)
    with torch.no_grad():
        batched, batched_embedding = rn_adapter.surgery_and_embedding(pixels)
        for i in range(len(scene_images)):
            single, single_embedding = rn_adapter.surgery_and_embedding(pixels[i : i + 1])
            torch.testing.assert_close(batched[i : i + 1], single, atol=1e-6, rtol=0)
            torch.testing.assert_close(batched_embedding[i : i + 1], single_embedding, atol=1e-6, rtol=0)


def test_single_text_uses_the_empty_class_redundant_feature(vit_adapter, scene_images):
    explainer = SurgeryExplainer(vit_adapter, ["red circle"], ensemble=False)
    torch.testing.assert_close(explainer.redundant, vit_adapter.text_embeddings([""], ensemble=False)[0])
    assert SurgeryExplainer(vit_adapter, TEXTS, ensemble=False).redundant is None
    (target,) = explainer.explain(scene_images[:1])[0]
    assert not target.degenerate and target.map.max() > 0.5  # bilinear upsampling may miss the exact peak


def test_map_has_the_original_image_size():
    from helpers import TINY_VIT, tiny_openclip

    explainer = SurgeryExplainer(tiny_openclip(TINY_VIT), TEXTS, ensemble=False)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 300, 3), dtype=np.uint8))
    targets = explainer.explain([image])[0]
    assert all(t.map.shape == (200, 300) for t in targets)
    assert all(0 <= t.map.min() and t.map.max() <= 1 for t in targets)


@pytest.mark.parametrize("size", ["48", "64x40"])
def test_other_sizes_leave_the_model_unchanged(vit_adapter, scene_images, size):
    before = {k: v.clone() for k, v in vit_adapter.model.state_dict().items()}
    explainer = SurgeryExplainer(vit_adapter, TEXTS, ensemble=False, size=parse_size(size))
    targets = explainer.explain(scene_images[:2])
    assert len(targets) == 2
    after = vit_adapter.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    native = SurgeryExplainer(vit_adapter, TEXTS, ensemble=False).explain(scene_images[:1])[0]
    assert native[0].map.shape == (48, 48)


def test_constant_image_gives_no_nan(vit_adapter):
    flat = Image.new("RGB", (40, 40), (120, 120, 120))
    for texts in (TEXTS, ["red circle"]):
        targets = SurgeryExplainer(vit_adapter, texts, ensemble=False).explain([flat])[0]
        for target in targets:
            assert np.isfinite(target.map).all() and np.isfinite(target.score)


def test_points_are_inside_the_image(vit_adapter, scene_images):
    targets = SurgeryExplainer(vit_adapter, TEXTS, ensemble=False, points=2).explain(scene_images[:1])[0]
    for target in targets:
        assert 1 <= len(target.extra["points"]) <= 2
        assert all(0 <= x < 48 and 0 <= y < 48 for x, y in target.extra["points"])


@pytest.mark.parametrize("bad", ["0", "abc", "10x", "5000"])
def test_bad_sizes_are_usage_errors(bad):
    with pytest.raises(UsageError):
        parse_size(bad)


def test_empty_text_is_a_usage_error(vit_adapter):
    with pytest.raises(UsageError):
        SurgeryExplainer(vit_adapter, ["  "], ensemble=False)


def test_ensemble_averages_85_normalised_prompts(vit_adapter):
    import torch.nn.functional as F

    from xattn_cli.text import ensemble_templates

    templates = ensemble_templates()
    assert len(templates) == 85
    prompts = F.normalize(vit_adapter.encode_text([t.format("star") for t in templates]), dim=-1)
    expected = F.normalize(prompts.mean(0), dim=-1)
    torch.testing.assert_close(vit_adapter.text_embeddings(["star"])[0], expected)
