"""Independent reference tests for CLIP Surgery (shared/reference/clip-surgery.md, sections 2-5).

Every reference below is a slow, literal transcription of the specification / the official
xmed-lab/CLIP_Surgery code (explicit loops over images, heads and classes, float64), written
without looking at the implementation under test. Models are tiny and randomly initialised;
all parameters (biases, norms, BatchNorm statistics included) are perturbed so that a wrong
bias, norm or path cannot hide behind an init value of zero or one.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

ATOL_MODEL = 1e-4
ATOL_FEAT = 1e-5



# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _d(t: torch.Tensor) -> torch.Tensor:
    """A float64 copy of a parameter / tensor (the references run in double precision)."""
    return t.detach().to(torch.float64)


@torch.no_grad()
def _perturb(model: torch.nn.Module, seed: int, scale: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(scale * torch.randn(p.shape, generator=g))
    for name, b in model.named_buffers():
        if name.endswith("running_mean"):
            b.copy_(0.1 * torch.randn(b.shape, generator=g))
        elif name.endswith("running_var"):
            b.copy_(0.5 + torch.rand(b.shape, generator=g))


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert set(after) == set(before), "the model's state_dict keys changed"
    for k, v in before.items():
        assert after[k].shape == v.shape, f"{k} changed shape: {tuple(v.shape)} -> {tuple(after[k].shape)}"
        assert torch.equal(after[k], v), f"{k} was mutated by surgery_features"


def _layer_norm(x: torch.Tensor, ln: torch.nn.LayerNorm) -> torch.Tensor:
    return F.layer_norm(x, ln.normalized_shape, _d(ln.weight), _d(ln.bias), ln.eps)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = x @ _d(weight).T
    return y if bias is None else y + _d(bias)


def _multi_head(
    y: torch.Tensor,  # [n, D] one image
    w_in: torch.Tensor,  # [3D, D]
    b_in: torch.Tensor,  # [3D]
    w_out: torch.Tensor,
    b_out: torch.Tensor,
    heads: int,
    mode: str,  # "qk" (original CLIP attention) or "vv" (CLIP Surgery v-v attention)
) -> torch.Tensor:
    """Spec 2.2, one image, explicit loop over heads."""
    n, D = y.shape
    d_h = D // heads
    scale = d_h ** -0.5
    qkv = _linear(y, w_in, b_in)  # [n, 3D]
    q, k, v = qkv[:, :D], qkv[:, D : 2 * D], qkv[:, 2 * D :]
    outs = []
    for h in range(heads):
        sl = slice(h * d_h, (h + 1) * d_h)
        v_h = v[:, sl]
        if mode == "qk":
            logits = scale * (q[:, sl] @ k[:, sl].T)
        elif mode == "vv":
            logits = scale * (v_h @ v_h.T)
        else:
            raise ValueError(mode)
        attn = torch.softmax(logits, dim=-1)  # row softmax, [n, n]
        outs.append(attn @ v_h)  # [n, d_h]
    merged = torch.cat(outs, dim=-1)  # [n, D], heads in order
    return _linear(merged, w_out, b_out)


def _interp_pos(pos: torch.Tensor, g0: tuple[int, int], g: tuple[int, int]) -> torch.Tensor:
    """Spec 2.5 generalised to gh x gw: CLS row kept, patch rows as a 1 x D x g0 x g0 image,
    bilinear (align_corners=False), flattened row-major."""
    if tuple(g0) == tuple(g):
        return pos
    D = pos.shape[1]
    grid = pos[1:].reshape(g0[0], g0[1], D).permute(2, 0, 1).unsqueeze(0)  # 1 x D x g0h x g0w
    grid = F.interpolate(grid, size=g, mode="bilinear", align_corners=False)
    rows = grid[0].permute(1, 2, 0).reshape(g[0] * g[1], D)
    return torch.cat([pos[:1], rows], dim=0)


# --------------------------------------------------------------------------------------------
# reference: open_clip ViT (spec 2.1-2.5)
# --------------------------------------------------------------------------------------------


def _tiny_openclip_vit(seed: int):
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.model.CLIP(
        embed_dim=32,
        vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=4, head_width=16),
        text_cfg=dict(context_length=16, vocab_size=100, width=32, heads=2, layers=1),
    )
    _perturb(model, seed + 1)
    return model.eval()


@torch.no_grad()
def ref_openclip_vit_surgery(model, pixels: torch.Tensor, blocks: int) -> torch.Tensor:
    v = model.visual
    assert v.conv1.bias is None
    patch = v.conv1.kernel_size
    B, _, H, W = pixels.shape
    gh, gw = H // patch[0], W // patch[1]
    n_pos = v.positional_embedding.shape[0] - 1
    g0 = int(round(math.sqrt(n_pos)))
    pos = _interp_pos(_d(v.positional_embedding), (g0, g0), (gh, gw))

    resblocks = list(v.transformer.resblocks)
    L = len(resblocks)
    start = L - blocks  # 0-indexed first surgery block (spec: d = L - blocks + 1, 1-indexed)
    out = []
    for b in range(B):
        x = F.conv2d(_d(pixels[b : b + 1]), _d(v.conv1.weight), stride=v.conv1.stride)  # 1 x D x gh x gw
        x = x[0].reshape(x.shape[1], gh * gw).T  # [N, D], row-major patches
        x = torch.cat([_d(v.class_embedding)[None], x], dim=0)  # [n, D]
        x = x + pos
        x = _layer_norm(x, v.ln_pre)

        o = x  # original path
        z = None  # new (surgery) path
        for idx, blk in enumerate(resblocks):
            assert isinstance(blk.ls_1, torch.nn.Identity) and isinstance(blk.ls_2, torch.nn.Identity)
            attn = blk.attn
            heads = attn.num_heads
            y = _layer_norm(o, blk.ln_1)  # LN1 of the ORIGINAL stream, always
            a_ori = _multi_head(y, attn.in_proj_weight, attn.in_proj_bias, attn.out_proj.weight,
                                attn.out_proj.bias, heads, "qk")
            if idx >= start:
                if z is None:
                    z = o.clone()  # z_{d-1} = o_{d-1}
                a_vv = _multi_head(y, attn.in_proj_weight, attn.in_proj_bias, attn.out_proj.weight,
                                   attn.out_proj.bias, heads, "vv")
                z = z + a_vv  # new path: no LN2, no FFN
            o = o + a_ori
            h = _layer_norm(o, blk.ln_2)
            h = _linear(h, blk.mlp.c_fc.weight, blk.mlp.c_fc.bias)
            h = blk.mlp.gelu(h)
            h = _linear(h, blk.mlp.c_proj.weight, blk.mlp.c_proj.bias)
            o = o + h
        assert z is not None
        z = z.clone()
        z[0] = o[0]  # CLS from the original path
        z = _layer_norm(z, v.ln_post)  # all tokens
        out.append(z @ _d(v.proj))
    return torch.stack(out).to(torch.float32)


def test_openclip_vit_reference_cls_matches_encode_image() -> None:
    """Self-check of the reference: its token 0 is CLIP's own image embedding (spec 2.4)."""
    model = _tiny_openclip_vit(0)
    torch.manual_seed(10)
    pixels = torch.randn(2, 3, 32, 32)
    ref = ref_openclip_vit_surgery(model, pixels, blocks=2)
    with torch.no_grad():
        expected = model.encode_image(pixels, normalize=False)
    torch.testing.assert_close(ref[:, 0], expected, atol=ATOL_MODEL, rtol=0)


@pytest.mark.parametrize("blocks", [2, 4])
def test_openclip_vit_surgery_native(blocks: int) -> None:
    from xattn_cli.models.openclip import OpenClipAdapter

    model = _tiny_openclip_vit(0)
    torch.manual_seed(11)
    pixels = torch.randn(2, 3, 32, 32)
    ref = ref_openclip_vit_surgery(model, pixels, blocks)
    before = _snapshot(model)
    adapter = OpenClipAdapter(model)
    with torch.no_grad():
        got = adapter.surgery_features(pixels, blocks=blocks)
    assert tuple(got.shape) == (2, 1 + 16, 32)
    assert tuple(adapter.grid(tuple(pixels.shape[-2:]))) == (4, 4)
    torch.testing.assert_close(got.float(), ref, atol=ATOL_MODEL, rtol=0)
    _assert_unchanged(model, before)


@pytest.mark.parametrize("blocks", [2, 4])
def test_openclip_vit_surgery_non_square_resized(blocks: int) -> None:
    from xattn_cli.models.openclip import OpenClipAdapter

    model = _tiny_openclip_vit(1)
    torch.manual_seed(12)
    pixels = torch.randn(2, 3, 48, 32)  # H=48, W=32 -> grid 6 x 4 (native 4 x 4)
    ref = ref_openclip_vit_surgery(model, pixels, blocks)
    before = _snapshot(model)
    adapter = OpenClipAdapter(model)
    assert tuple(adapter.grid(tuple(pixels.shape[-2:]))) == (6, 4)
    with torch.no_grad():
        got = adapter.surgery_features(pixels, blocks=blocks)
        # a second call at another size must interpolate from the ORIGINAL table again
        got_native = adapter.surgery_features(pixels[:, :, :32, :], blocks=blocks)
    assert tuple(got.shape) == (2, 1 + 24, 32)
    torch.testing.assert_close(got.float(), ref, atol=ATOL_MODEL, rtol=0)
    ref_native = ref_openclip_vit_surgery(model, pixels[:, :, :32, :], blocks)
    torch.testing.assert_close(got_native.float(), ref_native, atol=ATOL_MODEL, rtol=0)
    _assert_unchanged(model, before)


# --------------------------------------------------------------------------------------------
# reference: open_clip ModifiedResNet attention pool (spec 2.6)
# --------------------------------------------------------------------------------------------


def _tiny_openclip_rn(seed: int):
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.model.CLIP(
        embed_dim=32,
        vision_cfg=dict(image_size=64, layers=[1, 1, 1, 1], width=8, head_width=16),
        text_cfg=dict(context_length=16, vocab_size=100, width=32, heads=2, layers=1),
    )
    _perturb(model, seed + 1)
    return model.eval()


@torch.no_grad()
def _rn_trunk(visual, pixels: torch.Tensor) -> torch.Tensor:
    # The trunk is not touched by the surgery: run the model's own modules.
    x = visual.stem(pixels)
    x = visual.layer1(x)
    x = visual.layer2(x)
    x = visual.layer3(x)
    return visual.layer4(x)


@torch.no_grad()
def ref_openclip_rn_surgery(model, pixels: torch.Tensor) -> torch.Tensor:
    visual = model.visual
    pool = visual.attnpool
    feats = _rn_trunk(visual, pixels)  # [B, C, gh, gw]
    B, C, gh, gw = feats.shape
    n_pos = pool.positional_embedding.shape[0] - 1
    g0 = int(round(math.sqrt(n_pos)))
    pos = _interp_pos(_d(pool.positional_embedding), (g0, g0), (gh, gw))
    heads = pool.num_heads
    # q = k = v = v_proj(x): qkv weight [W_v; W_v; W_v], bias [b_v; b_v; b_v]; proj = c_proj
    w_in = torch.cat([pool.v_proj.weight] * 3, dim=0)
    b_in = torch.cat([pool.v_proj.bias] * 3, dim=0)
    out = []
    for b in range(B):
        x = _d(feats[b]).reshape(C, gh * gw).T  # [HW, C], row-major
        x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0) + pos  # [HW+1, C]
        # both "paths" of the official module are v-v here (q = k = v), so token 0 is the
        # v-v pooled mean token; the copy x[:, 0] = x_ori[:, 0] is a no-op.
        y = _multi_head(x, w_in, b_in, pool.c_proj.weight, pool.c_proj.bias, heads, "qk")
        y_vv = _multi_head(x, w_in, b_in, pool.c_proj.weight, pool.c_proj.bias, heads, "vv")
        assert torch.allclose(y, y_vv)
        out.append(y_vv)
    return torch.stack(out).to(torch.float32)


def test_openclip_rn_reference_matches_torch_mha_with_v_weights() -> None:
    """Self-check of the RN reference against torch's MHA fed with q=k=v weights = v_proj."""
    model = _tiny_openclip_rn(3)
    pool = model.visual.attnpool
    torch.manual_seed(13)
    pixels = torch.randn(2, 3, 64, 64)
    ref = ref_openclip_rn_surgery(model, pixels)
    with torch.no_grad():
        feats = _rn_trunk(model.visual, pixels)
        x = feats.flatten(2).permute(2, 0, 1)  # (HW) B C
        x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0) + pool.positional_embedding[:, None, :]
        y, _ = F.multi_head_attention_forward(
            query=x, key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=pool.num_heads,
            q_proj_weight=pool.v_proj.weight, k_proj_weight=pool.v_proj.weight,
            v_proj_weight=pool.v_proj.weight, in_proj_weight=None,
            in_proj_bias=torch.cat([pool.v_proj.bias] * 3), bias_k=None, bias_v=None,
            add_zero_attn=False, dropout_p=0.0, out_proj_weight=pool.c_proj.weight,
            out_proj_bias=pool.c_proj.bias, use_separate_proj_weight=True, training=False,
            need_weights=False,
        )
    torch.testing.assert_close(ref, y.transpose(0, 1), atol=ATOL_MODEL, rtol=0)


@pytest.mark.parametrize("size", [(64, 64), (96, 64)])
def test_openclip_rn_surgery(size: tuple[int, int]) -> None:
    from xattn_cli.models.openclip import OpenClipAdapter

    model = _tiny_openclip_rn(3)
    torch.manual_seed(14)
    pixels = torch.randn(2, 3, *size)
    gh, gw = size[0] // 32, size[1] // 32
    ref = ref_openclip_rn_surgery(model, pixels)
    before = _snapshot(model)
    adapter = OpenClipAdapter(model)
    assert tuple(adapter.grid(tuple(pixels.shape[-2:]))) == (gh, gw)
    with torch.no_grad():
        got = adapter.surgery_features(pixels, blocks=6)  # blocks is meaningless for RN
    assert tuple(got.shape) == (2, 1 + gh * gw, 32)
    torch.testing.assert_close(got.float(), ref, atol=ATOL_MODEL, rtol=0)
    _assert_unchanged(model, before)


# --------------------------------------------------------------------------------------------
# reference: Hugging Face CLIPModel (eager attention)
# --------------------------------------------------------------------------------------------


def _tiny_hf_clip(seed: int):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=98,
                         eos_token_id=99, pad_token_id=1),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=3, num_attention_heads=2),
        projection_dim=16,
    )
    model = CLIPModel._from_config(config, attn_implementation="eager")
    _perturb(model, seed + 1)
    return model.eval()


@torch.no_grad()
def ref_hf_surgery(model, pixels: torch.Tensor, blocks: int) -> torch.Tensor:
    vm = model.vision_model
    emb = vm.embeddings
    assert emb.patch_embedding.bias is None
    p = emb.patch_size
    B, _, H, W = pixels.shape
    gh, gw = H // p, W // p
    g0 = emb.image_size // p
    pos = _interp_pos(_d(emb.position_embedding.weight), (g0, g0), (gh, gw))
    layers = list(vm.encoder.layers)
    L = len(layers)
    start = L - blocks
    out = []
    for b in range(B):
        x = F.conv2d(_d(pixels[b : b + 1]), _d(emb.patch_embedding.weight), stride=p)
        x = x[0].reshape(x.shape[1], gh * gw).T
        x = torch.cat([_d(emb.class_embedding)[None], x], dim=0) + pos
        x = _layer_norm(x, vm.pre_layrnorm)
        o, z = x, None
        for idx, layer in enumerate(layers):
            att = layer.self_attn
            heads = att.num_heads
            w_in = torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight], dim=0)
            b_in = torch.cat([att.q_proj.bias, att.k_proj.bias, att.v_proj.bias], dim=0)
            y = _layer_norm(o, layer.layer_norm1)
            a_ori = _multi_head(y, w_in, b_in, att.out_proj.weight, att.out_proj.bias, heads, "qk")
            if idx >= start:
                if z is None:
                    z = o.clone()
                z = z + _multi_head(y, w_in, b_in, att.out_proj.weight, att.out_proj.bias, heads, "vv")
            o = o + a_ori
            h = _layer_norm(o, layer.layer_norm2)
            h = _linear(h, layer.mlp.fc1.weight, layer.mlp.fc1.bias)
            h = layer.mlp.activation_fn(h)
            h = _linear(h, layer.mlp.fc2.weight, layer.mlp.fc2.bias)
            o = o + h
        z = z.clone()
        z[0] = o[0]
        z = _layer_norm(z, vm.post_layernorm)
        out.append(_linear(z, model.visual_projection.weight, model.visual_projection.bias))
    return torch.stack(out).to(torch.float32)


def test_hf_reference_cls_matches_image_embeds() -> None:
    model = _tiny_hf_clip(5)
    torch.manual_seed(15)
    pixels = torch.randn(2, 3, 32, 32)
    ref = ref_hf_surgery(model, pixels, blocks=2)
    with torch.no_grad():
        pooled = model.vision_model(pixel_values=pixels).pooler_output
        expected = model.visual_projection(pooled)
    torch.testing.assert_close(ref[:, 0], expected, atol=ATOL_MODEL, rtol=0)


@pytest.mark.parametrize("blocks", [2, 3])
def test_hf_clip_surgery_native(blocks: int) -> None:
    from xattn_cli.models.hf_clip import HFClipAdapter

    model = _tiny_hf_clip(5)
    torch.manual_seed(16)
    pixels = torch.randn(2, 3, 32, 32)
    ref = ref_hf_surgery(model, pixels, blocks)
    before = _snapshot(model)
    adapter = HFClipAdapter(model)
    assert tuple(adapter.grid(tuple(pixels.shape[-2:]))) == (4, 4)
    with torch.no_grad():
        got = adapter.surgery_features(pixels, blocks=blocks)
    assert tuple(got.shape) == (2, 17, 16)
    torch.testing.assert_close(got.float(), ref, atol=ATOL_MODEL, rtol=0)
    _assert_unchanged(model, before)


def test_hf_clip_surgery_non_square_bilinear_pos() -> None:
    from xattn_cli.models.hf_clip import HFClipAdapter

    model = _tiny_hf_clip(6)
    torch.manual_seed(17)
    pixels = torch.randn(2, 3, 48, 32)  # grid 6 x 4
    ref = ref_hf_surgery(model, pixels, blocks=2)
    before = _snapshot(model)
    adapter = HFClipAdapter(model)
    assert tuple(adapter.grid(tuple(pixels.shape[-2:]))) == (6, 4)
    with torch.no_grad():
        got = adapter.surgery_features(pixels, blocks=2)
    assert tuple(got.shape) == (2, 25, 16)
    torch.testing.assert_close(got.float(), ref, atol=ATOL_MODEL, rtol=0)
    _assert_unchanged(model, before)


# --------------------------------------------------------------------------------------------
# reference: feature surgery (spec 3.2, 3.3), element-wise form of the official code
# --------------------------------------------------------------------------------------------


def ref_feature_surgery(image_features, text_features, redundant=None) -> torch.Tensor:
    img = _d(image_features)
    txt = _d(text_features)
    img = img / img.norm(dim=-1, keepdim=True)  # per token, over channels (spec 3.5)
    txt = txt / txt.norm(dim=-1, keepdim=True)
    B, n, E = img.shape
    K = txt.shape[0]
    out = []
    for i in range(B):  # the official code breaks for B > 1 (spec 3.4): loop per image
        f = img[i]  # [n, E]
        if redundant is not None:
            r = _d(redundant).reshape(1, E)
            r = r / r.norm(dim=-1, keepdim=True)
            out.append(f @ (txt - r).T)
            continue
        prob = f[:1, :] @ txt.T  # [1, K], CLS token only
        prob = (prob * 2).softmax(-1)
        w = prob / prob.mean(-1, keepdim=True)  # = K * softmax
        feats = f.reshape(n, 1, E) * txt.reshape(1, K, E)  # F_m, [n, K, E]
        feats = feats * w.reshape(1, K, 1)
        redundant_feats = feats.mean(1, keepdim=True)  # F_r, mean over classes
        out.append((feats - redundant_feats).sum(-1))  # [n, K]
    return torch.stack(out).to(torch.float32)


def _rand_features(seed: int, B=2, n=10, K=3, E=16):
    g = torch.Generator().manual_seed(seed)
    # un-normalised, with varied norms, so that a missing normalisation is visible
    img = torch.randn(B, n, E, generator=g) * (1 + 3 * torch.rand(B, n, 1, generator=g))
    txt = torch.randn(K, E, generator=g) * (1 + 3 * torch.rand(K, 1, generator=g))
    # make the CLS token of image 0 strongly aligned with class 1 -> non-uniform class weights
    a = min(1, K - 1)
    img[0, 0] = 2.5 * txt[a] / txt[a].norm() + 0.3 * img[0, 0] / img[0, 0].norm()
    return img, txt


def test_feature_surgery_multiclass_matches_elementwise_reference() -> None:
    from xattn_cli.methods.surgery import feature_surgery

    img, txt = _rand_features(0)
    ref = ref_feature_surgery(img, txt)
    got = feature_surgery(img, txt)
    assert tuple(got.shape) == (2, 10, 3)
    torch.testing.assert_close(got.float(), ref, atol=ATOL_FEAT, rtol=0)
    # each image on its own gives the same result (no cross-image leakage of class weights)
    for i in range(2):
        torch.testing.assert_close(feature_surgery(img[i : i + 1], txt).float(), ref[i : i + 1],
                                   atol=ATOL_FEAT, rtol=0)
    # pre-normalised inputs give the same result (normalisation is idempotent)
    got_n = feature_surgery(img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(got_n.float(), ref, atol=ATOL_FEAT, rtol=0)


def test_feature_surgery_redundant_matches_reference() -> None:
    from xattn_cli.methods.surgery import feature_surgery

    img, txt = _rand_features(1, K=2)
    g = torch.Generator().manual_seed(7)
    r = torch.randn(16, generator=g)
    r_unit = r / r.norm()
    # spec 3.3: r is the (already normalised) empty-class ensemble embedding
    ref = ref_feature_surgery(img, txt, r_unit)
    got = feature_surgery(img, txt, r_unit)
    assert tuple(got.shape) == (2, 10, 2)
    torch.testing.assert_close(got.float(), ref, atol=ATOL_FEAT, rtol=0)
    # explicit scalar form S = F_i . t_a - F_i . r on normalised inputs
    f = img / img.norm(dim=-1, keepdim=True)
    t = txt / txt.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(got.float(), f @ t.T - (f @ r_unit)[..., None], atol=ATOL_FEAT, rtol=0)
    # our documented interface: an un-normalised r is normalised first
    torch.testing.assert_close(feature_surgery(img, txt, 5.0 * r).float(), ref, atol=ATOL_FEAT, rtol=0)
    # K = 1 with redundant is a real map, not zero
    got1 = feature_surgery(img, txt[:1], r_unit)
    torch.testing.assert_close(got1.float(), ref_feature_surgery(img, txt[:1], r_unit), atol=ATOL_FEAT, rtol=0)


def test_feature_surgery_single_class_without_redundant_is_zero() -> None:
    from xattn_cli.methods.surgery import feature_surgery

    img, txt = _rand_features(2, K=1)
    ref = ref_feature_surgery(img, txt)
    assert torch.count_nonzero(ref.abs() > 1e-7) == 0  # self-check of the reference
    got = feature_surgery(img, txt)
    assert tuple(got.shape) == (2, 10, 1)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), torch.zeros_like(ref), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------
# reference: similarity map (spec 4)
# --------------------------------------------------------------------------------------------


def ref_similarity_map(sim: torch.Tensor, grid, size) -> torch.Tensor:
    gh, gw = grid
    H, W = size
    sim = _d(sim)
    B, n, K = sim.shape
    assert n == 1 + gh * gw
    out = torch.zeros(B, K, H, W, dtype=torch.float64)
    for b in range(B):
        for k in range(K):
            col = sim[b, 1:, k]  # patch tokens only
            lo, hi = col.min(), col.max()
            if hi - lo == 0:
                continue  # degenerate: zeros
            col = (col - lo) / (hi - lo)
            img = col.reshape(gh, gw)  # row-major
            up = F.interpolate(img[None, None], size=(H, W), mode="bilinear", align_corners=False)
            out[b, k] = up[0, 0]
    return out.to(torch.float32)


@pytest.mark.parametrize("grid,size", [((4, 4), (64, 64)), ((3, 5), (200, 300)), ((6, 4), (50, 37))])
def test_similarity_map_matches_reference(grid, size) -> None:
    from xattn_cli.methods.surgery import similarity_map

    g = torch.Generator().manual_seed(grid[0] * 10 + grid[1])
    sim = torch.randn(2, 1 + grid[0] * grid[1], 3, generator=g)
    sim[:, 0] = 100.0  # a huge CLS value must be ignored (dropped before the min-max)
    ref = ref_similarity_map(sim, grid, size)
    got = similarity_map(sim, grid, size)
    assert tuple(got.shape) == (2, 3, *size)
    torch.testing.assert_close(got.float(), ref, atol=ATOL_FEAT, rtol=0)
    assert got.min() >= -1e-6 and got.max() <= 1 + 1e-6


def test_similarity_map_degenerate_column_gives_zeros() -> None:
    from xattn_cli.methods.surgery import similarity_map

    g = torch.Generator().manual_seed(3)
    sim = torch.randn(2, 1 + 15, 3, generator=g)
    sim[0, 1:, 1] = 0.37  # constant patch column for image 0, class 1
    sim[1, :, :] = 0.0  # everything constant for image 1 (e.g. K = 1 feature surgery output)
    ref = ref_similarity_map(sim, (3, 5), (200, 300))
    got = similarity_map(sim, (3, 5), (200, 300))
    assert torch.isfinite(got).all()
    assert torch.count_nonzero(got[0, 1]) == 0 and torch.count_nonzero(got[1]) == 0
    torch.testing.assert_close(got.float(), ref, atol=ATOL_FEAT, rtol=0)


# --------------------------------------------------------------------------------------------
# reference: text -> points for SAM (spec 5.3, official similarity_map_to_points)
# --------------------------------------------------------------------------------------------


def ref_similarity_to_points(sm: torch.Tensor, shape, t=0.8, down_sample=2):
    """Line-by-line transcription of the official function (square grid), float64."""
    sm = _d(sm)
    side = int(sm.shape[0] ** 0.5)
    sm = sm.reshape(1, 1, side, side)
    down_side = side // down_sample
    sm = F.interpolate(sm, (down_side, down_side), mode="bilinear")[0, 0, :, :]
    h, w = sm.shape
    sm = sm.reshape(-1)
    sm = (sm - sm.min()) / (sm.max() - sm.min())
    rank = sm.sort(0)[1]
    scale_h = float(shape[0]) / h
    scale_w = float(shape[1]) / w
    num = int(min((sm >= t).sum(), sm.shape[0] // 2))
    labels = [1] * num + [0] * num
    points = []
    for idx in rank[-num:]:  # positives
        x = min((idx % w + 0.5) * scale_w, shape[1] - 1)
        y = min((idx // w + 0.5) * scale_h, shape[0] - 1)
        points.append([int(x), int(y)])
    for idx in rank[:num]:  # negatives
        x = min((idx % w + 0.5) * scale_w, shape[1] - 1)
        y = min((idx // w + 0.5) * scale_h, shape[0] - 1)
        points.append([int(x), int(y)])
    return points, labels


def _points_case(seed: int, crowd_high: bool):
    g = torch.Generator().manual_seed(seed)
    sm = torch.randn(64, generator=g)
    if crowd_high:
        # almost everything near the max after 2x2 pooling -> num capped at M // 2 = 8
        sm = 5.0 + 0.05 * sm
        sm[:2] = -10.0
    return sm


@pytest.mark.parametrize("seed,crowd_high", [(0, False), (1, False), (2, True)])
def test_similarity_to_points_matches_reference(seed: int, crowd_high: bool) -> None:
    from xattn_cli.methods.surgery import similarity_to_points

    sm = _points_case(seed, crowd_high)
    size = (120, 160)  # (H, W)
    ref_pts, ref_labels = ref_similarity_to_points(sm, size)
    if crowd_high:
        assert len(ref_labels) == 16  # self-check: capped at M // 2 = 8 positives
    points, labels = similarity_to_points(sm, (8, 8), size)
    points = [[int(p[0]), int(p[1])] for p in points]
    labels = [int(v) for v in labels]
    assert labels == ref_labels
    num = len(ref_labels) // 2
    # same sets of positive / negative points ...
    assert sorted(points[:num]) == sorted(ref_pts[:num])
    assert sorted(points[num:]) == sorted(ref_pts[num:])
    # ... in the official order (positives ascending by score, then negatives ascending)
    assert points == ref_pts
    for x, y in points:
        assert 0 <= x < size[1] and 0 <= y < size[0]
