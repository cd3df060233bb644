"""Ψ (the masked softmax of MEAT / DynamicViT) against a literal loop, and `TokenMask` against physically
dropping the masked tokens, on tiny random models of each backend (reference/meat.md §5.1–2)."""
from __future__ import annotations

import math

import pytest
import torch

from xattn_cli.capture import AttentionRecorder, TokenMask
from xattn_cli.nn.masked_attention import (keep_ratio_loss, masked_softmax, renormalise, straight_through_gumbel,
                                           gumbel_noise)


def literal_psi(scores, keep, prefix, keep_self):
    """Ψ_ij = P_ij e^{A_ij} / Σ_s P_is e^{A_is}, P_ij = m_j + (1 − m_j) δ_ij, prefix keys kept: one entry at a time."""
    out = torch.zeros_like(scores)
    batch, heads, queries, keys = scores.shape
    for b in range(batch):
        for h in range(heads):
            for i in range(queries):
                policy = [1.0 if j < prefix else float(keep[b, j]) for j in range(keys)]
                if keep_self:
                    policy[i] = 1.0
                total = sum(policy[s] * math.exp(float(scores[b, h, i, s])) for s in range(keys))
                for j in range(keys):
                    out[b, h, i, j] = policy[j] * math.exp(float(scores[b, h, i, j])) / total
    return out


def random_keep(batch, tokens, generator, prefix=1):
    """(B, tokens) 0/1, prefix kept, 10–90 % of the other tokens kept, a different mask per sample."""
    keep = torch.zeros(batch, tokens, dtype=torch.float64)
    keep[:, :prefix] = 1
    patches = tokens - prefix
    for b in range(batch):
        count = int(torch.randint(max(1, round(0.1 * patches)), round(0.9 * patches) + 1, (1,), generator=generator))
        keep[b, prefix + torch.randperm(patches, generator=generator)[:count]] = 1
    return keep


@pytest.mark.parametrize("keep_self", [True, False])
def test_masked_softmax_is_the_literal_formula_and_renormalise_equals_it(keep_self):
    generator = torch.Generator().manual_seed(0)
    scores = 3 * torch.randn(2, 2, 6, 6, generator=generator, dtype=torch.float64)
    scores[0, 0, 2, 4] = 40.0  # a row whose maximum sits on a masked key
    keep = random_keep(2, 6, generator)
    keep[0, 4] = 0
    psi = masked_softmax(scores, keep, prefix=1, keep_self=keep_self)
    assert torch.allclose(psi, literal_psi(scores, keep, 1, keep_self), rtol=0, atol=1e-12)
    renormalised = renormalise(scores.softmax(-1), keep, prefix=1, keep_self=keep_self)
    assert torch.allclose(renormalised, psi, rtol=0, atol=1e-12)
    masked_keys = (keep == 0)[:, None, None, :].expand_as(psi).clone()
    if keep_self:
        masked_keys &= ~torch.eye(6, dtype=torch.bool)
    assert (psi[masked_keys] == 0).all() and masked_keys.any()


def test_gradients_reach_kept_and_masked_patches():
    generator = torch.Generator().manual_seed(1)
    scores = torch.randn(1, 2, 5, 5, generator=generator, dtype=torch.float64)
    logits = torch.tensor([[[1.0, -1.0], [-1.0, 1.0], [1.0, -1.0], [-1.0, 1.0]]], dtype=torch.float64, requires_grad=True)
    keep_patches = straight_through_gumbel(logits, 1.0, torch.zeros(1, 4, 2, dtype=torch.float64))
    assert keep_patches.tolist() == [[1.0, 0.0, 1.0, 0.0]]  # exact 0/1 in the forward pass
    keep = torch.cat([torch.ones(1, 1, dtype=torch.float64), keep_patches], dim=1)
    values = torch.randn(1, 2, 5, 3, generator=generator, dtype=torch.float64)
    (masked_softmax(scores, keep) @ values).sum().backward()
    grad = logits.grad[0, :, 0]
    assert torch.isfinite(grad).all() and (grad != 0).all()


def test_keep_ratio_loss_and_gumbel_noise():
    keep = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    assert keep_ratio_loss(keep, 0.25).tolist() == [0.0, 0.5625]
    first = gumbel_noise((3, 2), torch.Generator().manual_seed(5))
    assert torch.equal(first, gumbel_noise((3, 2), torch.Generator().manual_seed(5)))


# --- masked = dropped ---------------------------------------------------------------------------------
def _tiny_hf_vit():
    import transformers

    from xattn_cli.models.vit import HFViTAdapter

    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=3, num_attention_heads=2, num_labels=4)
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(config)
    adapter = HFViTAdapter(model)
    return adapter, model.vit.embeddings, adapter.classify


def _tiny_timm_vit():
    import timm

    from xattn_cli.models.vit import TimmViTAdapter

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=3,
                              num_classes=4)
    adapter = TimmViTAdapter(model)
    return adapter, model.patch_drop, adapter.classify


def _tiny_hf_clip(tmp_path):
    from helpers import save_tiny_hf_clip
    from xattn_cli.models.hf_clip import HFClipAdapter

    model = save_tiny_hf_clip(tmp_path / "clip")
    adapter = HFClipAdapter(model)
    return adapter, model.vision_model.embeddings, adapter.encode_image


def _tiny_openclip():
    from helpers import TINY_VIT, tiny_openclip

    adapter = tiny_openclip(TINY_VIT)
    return adapter, adapter.model.visual.patch_dropout, adapter.encode_image


FAMILIES = {"hf-vit": _tiny_hf_vit, "timm-vit": _tiny_timm_vit, "hf-clip": _tiny_hf_clip, "openclip-vit": _tiny_openclip}


def _build(family, tmp_path):
    return FAMILIES[family](tmp_path) if family == "hf-clip" else FAMILIES[family]()


def _dropped(forward, cut_at, pixels, keep):
    """Each sample alone, its token sequence cut to the kept tokens where `cut_at` returns it."""
    outputs = []
    for b in range(pixels.shape[0]):
        kept = keep[b].nonzero().flatten()
        handle = cut_at.register_forward_hook(lambda _m, _i, tokens: tokens[:, kept])
        try:
            outputs.append(forward(pixels[b : b + 1]))
        finally:
            handle.remove()
    return torch.cat(outputs)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-9), (torch.float32, 5e-5)])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_masked_equals_dropped(family, dtype, tolerance, tmp_path):
    adapter, cut_at, forward = _build(family, tmp_path)
    adapter.model.to(dtype)
    sites = [site for site in adapter.attention_sites() if site.stream == "vision"]
    generator = torch.Generator().manual_seed(3)
    pixels = torch.randn(3, 3, 32, 32, generator=generator, dtype=dtype)
    grid = adapter.grid() if family.endswith("-vit") and not family.startswith("openclip") else adapter.grid((32, 32))
    keep = random_keep(3, 1 + grid[0] * grid[1], generator).to(dtype)
    with torch.no_grad():
        with TokenMask(sites, keep):
            masked = forward(pixels)
        dropped = _dropped(forward, cut_at, pixels, keep)
        full = forward(pixels)
    assert (masked - dropped).abs().max() <= tolerance
    assert (masked - full).abs().max() > 100 * tolerance  # the mask changed the output: the check can fail


@pytest.mark.parametrize("recorder_first", [True, False])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_recording_under_a_mask_records_psi(family, recorder_first, tmp_path):
    adapter, _, forward = _build(family, tmp_path)
    sites = [site for site in adapter.attention_sites() if site.stream == "vision"]
    generator = torch.Generator().manual_seed(4)
    pixels = torch.randn(3, 3, 32, 32, generator=generator)
    grid = adapter.grid() if family.endswith("-vit") and not family.startswith("openclip") else adapter.grid((32, 32))
    tokens = 1 + grid[0] * grid[1]
    keep = random_keep(3, tokens, generator).float()
    mask, recorder = TokenMask(sites, keep), AttentionRecorder(sites)
    with torch.no_grad(), (recorder if recorder_first else mask), (mask if recorder_first else recorder):
        forward(pixels)
    events = recorder.recording.select(stream="vision")
    assert len(events) == len(sites)
    masked_keys = (keep == 0)[:, None, None, :] & ~torch.eye(tokens, dtype=torch.bool)  # (B, 1, N, N)
    for event in events:
        assert (event.probs.masked_select(masked_keys) == 0).all()
        assert torch.allclose(event.probs.sum(-1), torch.ones(()), atol=1e-5)
    with torch.no_grad():  # everything undone: a plain run records plain softmax again
        with AttentionRecorder(sites) as plain:
            forward(pixels)
    assert (plain.events[0].probs.masked_select(masked_keys) > 0).all()
