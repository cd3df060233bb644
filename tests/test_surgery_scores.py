"""The surgery explainer's `score` is CLIP's own image-text cosine: open_clip's `encode_image` against the
text embedding built from open_clip's `encode_text` with the same prompts (reference/clip-surgery.md §3.1:
each of the 85 templates encoded, normalised, averaged, normalised again; or the bare text).

Both towers: the ViT score comes from the original path's CLS, the ModifiedResNet score from the attention
pool's original q-k query (not the v-v surgery token), so a change to either shows here."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import TINY_RN, TINY_VIT, tiny_openclip

TEXTS = [["red circle", "blue square", "star"], ["star"]]  # several texts, and one (redundant feature on)


def _perturbed(adapter, seed: int):
    """open_clip initialises some projections to zero-ish values; spread the weights so texts differ."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in adapter.model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return adapter


def _text_embedding(model, tokenizer, text: str, ensemble: bool) -> torch.Tensor:
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    from xattn_cli.text import SCENE_TEMPLATES

    prompts = ([template(text) for template in OPENAI_IMAGENET_TEMPLATES] + [t.format(text) for t in SCENE_TEMPLATES]
               if ensemble else [text])
    assert len(prompts) == (85 if ensemble else 1)
    with torch.no_grad():
        encoded = F.normalize(model.encode_text(tokenizer(prompts)), dim=-1)  # (T, E)
    return F.normalize(encoded.mean(dim=0), dim=-1)  # (E,)


@pytest.mark.parametrize("texts", TEXTS, ids=["three-texts", "one-text"])
@pytest.mark.parametrize("ensemble", [True, False], ids=["ensemble", "bare"])
@pytest.mark.parametrize("arch", [TINY_RN, TINY_VIT], ids=["resnet", "vit"])
def test_score_is_cosine_of_encode_image_and_text(arch, ensemble, texts, scene_images):
    from xattn_cli.explainers.surgery import SurgeryExplainer

    adapter = _perturbed(tiny_openclip(arch, seed=7), seed=8)
    images = scene_images[:3]
    explainer = SurgeryExplainer(adapter, texts, ensemble=ensemble, size=adapter.native_size, text_cache=False)
    results = explainer.explain(images)
    pixels = adapter.preprocess(images, adapter.native_size)  # (B, 3, H, W)
    with torch.no_grad():
        image_features = F.normalize(adapter.model.encode_image(pixels), dim=-1)  # (B, E)
    text_features = torch.stack([_text_embedding(adapter.model, adapter.tokenizer, t, ensemble) for t in texts])
    expected = image_features @ text_features.T  # (B, K)
    assert float(expected.std()) > 2e-4, "degenerate test model: all scores alike"
    for i, targets in enumerate(results):
        assert [t.target for t in targets] == texts
        for k, target in enumerate(targets):
            assert target.score == pytest.approx(float(expected[i, k]), abs=1e-5)
