"""open_clip towers built on timm trunks: tiny SigLIP-style (attention-pool head, no CLS) and EVA02-style
(rotary positions, separate or fused q/k/v) CLIPs with a local tokenizer; convolutional towers refused."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import CharTokenizer

TEXT_CFG = dict(context_length=16, vocab_size=100, width=32, heads=2, layers=1)


def _register_tiny_trunks() -> None:
    """Tiny timm variants of the SigLIP and EVA02-CLIP trunks, under names open_clip's `TimmModel` can build."""
    from timm.models import is_model, register_model
    from timm.models.eva import _create_eva
    from timm.models.vision_transformer import _create_vision_transformer

    if is_model("xattn_tiny_siglip"):
        return

    @register_model
    def xattn_tiny_siglip(pretrained=False, **kwargs):
        args = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, class_token=False,
                    global_pool="map")
        return _create_vision_transformer("vit_base_patch16_siglip_224", pretrained=False, **dict(args, **kwargs))

    for fused in (False, True):
        def build(pretrained=False, _fused=fused, **kwargs):
            args = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, qkv_fused=_fused,
                        mlp_ratio=4 * 2 / 3, swiglu_mlp=True, scale_mlp=True, scale_attn_inner=True,
                        use_rot_pos_emb=True, ref_feat_shape=(4, 4), global_pool="token")
            return _create_eva("eva02_base_patch16_clip_224", pretrained=False, **dict(args, **kwargs))

        build.__name__ = f"xattn_tiny_eva02{'_fused' if fused else ''}"
        register_model(build)


def _tiny_timm_clip(trunk: str, pool: str, proj: str | None, seed: int = 0):
    from open_clip.model import CustomTextCLIP

    from xattn_cli.models.openclip import OpenClipAdapter

    _register_tiny_trunks()
    torch.manual_seed(seed)
    vision_cfg = dict(image_size=32, timm_model_name=trunk, timm_pool=pool, timm_proj=proj)
    model = CustomTextCLIP(embed_dim=32, vision_cfg=vision_cfg, text_cfg=TEXT_CFG).eval()
    with torch.no_grad():  # timm zero-initialises biases, probes and layer scales: make every path count
        for parameter in model.visual.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return OpenClipAdapter(model, CharTokenizer(), name=f"tiny-{trunk}")


def siglip():
    return _tiny_timm_clip("xattn_tiny_siglip", "map", "none")


def eva02(fused: bool = False):
    return _tiny_timm_clip(f"xattn_tiny_eva02{'_fused' if fused else ''}", "token", None)


TOWERS = {"siglip": siglip, "eva02": eva02, "eva02-fused": lambda: eva02(fused=True)}


@pytest.mark.parametrize("tower", sorted(TOWERS))
@pytest.mark.parametrize("blocks", [1, 3])
def test_surgery_token_zero_is_the_models_own_embedding(tower: str, blocks: int) -> None:
    """The original stream, run through our block views (q/k/v, rotary positions, layer scale, FFN), must
    reproduce timm's own forward: token 0 and the embedding equal `encode_image`."""
    adapter = TOWERS[tower]()
    torch.manual_seed(3)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens, embedding = adapter.surgery_and_embedding(pixels, blocks)
        expected = adapter.model.encode_image(pixels)
    assert tuple(tokens.shape) == (2, 1 + 16, 32)
    torch.testing.assert_close(embedding, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tokens[:, 0], expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(tokens[:, 1], tokens[:, 2])  # patches differ from each other


def test_attention_pool_value_path_is_the_pool_on_one_token() -> None:
    """Each SigLIP surgery token goes through the MAP head as its only key: the head's own forward on a
    one-token sequence must give the same feature."""
    from xattn_cli.models.openclip_timm import _per_token_head

    visual = siglip().model.visual
    torch.manual_seed(4)
    tokens = torch.randn(2, 5, 32)
    with torch.no_grad():
        ours = _per_token_head(visual, tokens)  # (2, 5, 32)
        theirs = torch.stack([visual.head(visual.trunk.forward_head(tokens[:, i : i + 1])) for i in range(5)], dim=1)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tower", sorted(TOWERS))
def test_surgery_maps_at_another_size(tower: str) -> None:
    """A non-native, non-square input: positional tables are resized and EVA's rotary grid follows."""
    from xattn_cli.explainers.surgery import SurgeryExplainer

    adapter = TOWERS[tower]()
    explainer = SurgeryExplainer(adapter, ["red", "blue"], ensemble=False, size=(48, 32), text_cache=False)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    [targets] = explainer.explain([image])
    assert [t.target for t in targets] == ["red", "blue"]
    for target in targets:
        assert target.map.shape == (40, 60) and np.isfinite(target.map).all()
        assert not target.degenerate


def test_eva_relevancy_reads_the_cls_row() -> None:
    from xattn_cli.explainers.relevancy import ClipRelevancy

    adapter = eva02()
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    [targets] = ClipRelevancy(adapter, ["red"], method="chefer").explain([image])
    assert targets[0].map.shape == (32, 32) and not targets[0].degenerate
    assert len(adapter.attention_sites()) == 3 + 1  # three vision blocks, one text block


def test_attention_pool_tower_refuses_relevancy_in_one_line() -> None:
    from xattn_cli.errors import UsageError

    with pytest.raises(UsageError, match="pools its image tokens") as caught:
        siglip().attention_sites()
    assert "\n" not in str(caught.value)


def test_convolutional_tower_is_refused_in_one_line() -> None:
    from xattn_cli.errors import UsageError

    with pytest.raises(UsageError, match="ConvNeXt, a convolutional network") as caught:
        _tiny_timm_clip("convnext_atto", "", "linear")
    assert "\n" not in str(caught.value)


def test_an_uncached_hugging_face_tokenizer_is_one_line_before_any_model_is_built(monkeypatch) -> None:
    """SigLIP's open_clip configs name a Hugging Face tokenizer; offline and not cached, that is a usage error
    (the model, 200M random parameters, is not built first)."""
    import open_clip

    from xattn_cli.errors import UsageError
    from xattn_cli.models.registry import load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    built = []
    monkeypatch.setattr(open_clip, "create_model", lambda *args, **kwargs: built.append(args))
    with pytest.raises(UsageError, match="cannot load the tokenizer of open_clip ViT-B-16-SigLIP") as caught:
        load_model("openclip:ViT-B-16-SigLIP")
    assert "\n" not in str(caught.value) and built == []


@pytest.mark.parametrize("vision, text, refused", [
    ({"pool_type": "avg"}, {}, "pool by 'avg'"),  # CLIPA-style towers: the embedding is the patch mean
    ({}, {"pool_type": "last"}, "pool by 'last'"),
])
def test_towers_that_do_not_read_the_class_or_end_token_are_refused(vision, text, refused):
    from open_clip.model import CLIP

    from xattn_cli.errors import UsageError
    from xattn_cli.models.openclip import OpenClipAdapter

    model = CLIP(embed_dim=16, vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=1, head_width=16, **vision),
                 text_cfg=dict(context_length=8, vocab_size=50, width=32, heads=2, layers=1, **text))
    with pytest.raises(UsageError, match=refused):
        OpenClipAdapter(model, name="tiny")
