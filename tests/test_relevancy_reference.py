"""Independent reference tests for Chefer et al. relevancy (shared/reference/chefer-relevancy.md §0-3, §6).

Every reference here is a slow, literal transcription of the paper's rules and of the official code
(hila-chefer/Transformer-MM-Explainability: `CLIP_explainability.ipynb` `interpret`, the ViT notebook,
`gradcam`; hila-chefer/Transformer-Explainability: `compute_rollout_attention`, `handle_residual`),
written without reading the implementation under test.

Attention probabilities and their gradients are obtained WITHOUT the package's recorder:
  * open_clip and timm: a hand-written forward of each tower with explicit per-head softmax attention;
  * Hugging Face: `output_attentions=True` on an eager-attention float64 copy, gradients by autograd.grad.
Each hand-written forward is first checked against the model's own output. References run in float64
on a copy of the model; the models are tiny, random, and perturbed so that nothing is symmetric.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from helpers import TINY_VIT, CharTokenizer, tiny_openclip

ATOL_MAP = 1e-5  # classifiers
ATOL_CLIP = 1e-4  # CLIP maps and token relevances (the brief's tolerance)
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
TEXTS = ["red circle", "blue", "a green square"]



# ------------------------------------------------------------------------------------------------
# models and inputs
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def _perturb(model: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model.eval()


def _images() -> list[Image.Image]:
    from xattn_cli.world.shapes import scene_at

    images = [scene_at(11, i, size=48).image for i in range(8)]
    images[1] = images[1].resize((56, 40))  # non-square: (W, H) = (56, 40), catches transposed maps
    images[5] = images[5].resize((36, 52))
    return images


def _pixels(images, size, mean, std) -> torch.Tensor:
    """Squash to (H, W) with PIL bicubic, /255, normalise. (B, 3, H, W) float32."""
    height, width = size
    out = []
    for image in images:
        arr = np.asarray(image.convert("RGB").resize((width, height), Image.BICUBIC), dtype=np.float32) / 255.0
        t = torch.from_numpy(arr).permute(2, 0, 1)
        t = (t - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
        out.append(t)
    return torch.stack(out)


def _make_openclip():
    adapter = tiny_openclip(TINY_VIT, seed=3)
    _perturb(adapter.model, seed=30)
    return adapter


def _make_timm():
    import timm

    from xattn_cli.models.vit import TimmViTAdapter

    torch.manual_seed(4)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              num_classes=3)
    return TimmViTAdapter(_perturb(model, seed=40))


def _make_hf_vit(attn: str = "sdpa"):
    import transformers

    from xattn_cli.models.vit import HFViTAdapter

    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=3,
                                    num_attention_heads=2, intermediate_size=64, num_labels=4)
    torch.manual_seed(5)
    model = transformers.ViTForImageClassification(config)
    _perturb(model, seed=50)
    model.set_attn_implementation(attn)
    return HFViTAdapter(model)


@pytest.fixture(scope="module")
def hf_clip_folder(tmp_path_factory):
    from helpers import save_tiny_hf_clip

    folder = tmp_path_factory.mktemp("relref") / "hf-clip"
    save_tiny_hf_clip(folder)
    return folder


def _make_hf_clip(folder, attn: str = "sdpa"):
    import transformers

    from xattn_cli.models.hf_clip import HFClipAdapter

    model = transformers.CLIPModel.from_pretrained(folder, attn_implementation=attn)
    _perturb(model, seed=60)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder)
    return HFClipAdapter(model, tokenizer)


# ------------------------------------------------------------------------------------------------
# literal rules (spec §1.2-1.3, §2.1, §3; official code)
# ------------------------------------------------------------------------------------------------


def _chefer_literal(probs: list[torch.Tensor], grads: list[torch.Tensor], start_layer: int) -> torch.Tensor:
    """One sample. probs/grads: per layer (H, N, N). R = I; for l >= start: Ā = (1/H) Σ_h max(0, ∇A_h ⊙ A_h); R += Ā R."""
    n = probs[0].shape[-1]
    R = torch.eye(n, dtype=torch.float64)
    for layer in range(len(probs)):
        if layer < start_layer:
            continue
        heads = probs[layer].shape[0]
        Abar = torch.zeros(n, n, dtype=torch.float64)
        for h in range(heads):
            Abar += torch.clamp(grads[layer][h].double() * probs[layer][h].double(), min=0)
        Abar /= heads
        R = R + Abar @ R
    return R


def _rollout_literal(probs: list[torch.Tensor], start_layer: int) -> torch.Tensor:
    """Transformer-Explainability `compute_rollout_attention` on head means (`generate_rollout`), one sample."""
    all_layer_matrices = []
    for attn_heads in probs:
        all_layer_matrices.append((attn_heads.double().sum(dim=0) / attn_heads.shape[0]).unsqueeze(0))
    num_tokens = all_layer_matrices[0].shape[1]
    eye = torch.eye(num_tokens, dtype=torch.float64).expand(1, num_tokens, num_tokens)
    all_layer_matrices = [m + eye for m in all_layer_matrices]
    matrices_aug = [m / m.sum(dim=-1, keepdim=True) for m in all_layer_matrices]
    joint_attention = matrices_aug[start_layer]
    for i in range(start_layer + 1, len(matrices_aug)):
        joint_attention = matrices_aug[i].bmm(joint_attention)
    return joint_attention[0]


def _raw_literal(probs: list[torch.Tensor]) -> torch.Tensor:
    """Last layer attention, heads averaged (`mean(dim=0)`), no gradients."""
    return probs[-1].double().mean(dim=0)


def _gradcam_literal(probs: list[torch.Tensor], grads: list[torch.Tensor]) -> torch.Tensor:
    """MM `gradcam(cam, grad)` on the last layer: per-head weight = mean of its gradient over the whole map."""
    cam, grad = probs[-1].double(), grads[-1].double()
    cam = cam.reshape(-1, cam.shape[-2], cam.shape[-1])
    grad = grad.reshape(-1, grad.shape[-2], grad.shape[-1])
    grad = grad.mean(dim=[1, 2], keepdim=True)
    cam = (cam * grad).mean(0).clamp(min=0)
    return cam


def _relevance_literal(method, probs, grads, start_layer):
    if method == "chefer":
        return _chefer_literal(probs, grads, start_layer)
    if method == "rollout":
        return _rollout_literal(probs, start_layer)
    if method == "raw":
        return _raw_literal(probs)
    if method == "attn-gradcam":
        return _gradcam_literal(probs, grads)
    raise AssertionError(method)


def _map_literal(patch_relevance: torch.Tensor, grid, size):
    """(N,) → reshape (1, 1, gh, gw) → bilinear (align_corners=False) to (H, W) → min-max.
    Returns (map, degenerate)."""
    gh, gw = grid
    up = F.interpolate(patch_relevance.double().reshape(1, 1, gh, gw), size=size, mode="bilinear",
                       align_corners=False)[0, 0]
    lo, hi = up.min(), up.max()
    if not torch.isfinite(hi - lo) or float(hi - lo) <= 1e-9 * max(1.0, float(hi.abs())):
        return np.zeros(size), True
    return ((up - lo) / (hi - lo)).numpy(), False


def _assert_map(target_map, expected, degenerate, atol):
    assert target_map.map.shape == expected.shape
    assert target_map.map.dtype == np.float32
    assert bool(target_map.degenerate) == degenerate
    np.testing.assert_allclose(target_map.map, expected, atol=atol, rtol=0)


# ------------------------------------------------------------------------------------------------
# hand-written forwards with explicit per-head attention
# ------------------------------------------------------------------------------------------------


def _open_clip_block(block, x, mask=None):
    """open_clip ResidualAttentionBlock, attention written out per head. x: (B, n, D)."""
    attn = block.attn
    heads = attn.num_heads
    h = block.ln_1(x)
    B, n, D = h.shape
    d = D // heads
    qkv = h @ attn.in_proj_weight.t() + attn.in_proj_bias
    q, k, v = qkv[..., :D], qkv[..., D:2 * D], qkv[..., 2 * D:]

    def split(t):
        return t.reshape(B, n, heads, d).permute(0, 2, 1, 3)

    q, k, v = split(q), split(k), split(v)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
    if mask is not None:
        scores = scores + mask
    probs = torch.softmax(scores, dim=-1)  # (B, H, n, n): the tensor that multiplies V
    out = (probs @ v).permute(0, 2, 1, 3).reshape(B, n, D)
    x = x + block.ls_1(attn.out_proj(out))
    x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return x, probs


def _open_clip_image(model, pixels):
    visual = model.visual
    assert visual.attn_pool is None and getattr(visual, "pool_type", "tok") == "tok"
    x = visual.conv1(pixels).flatten(2).transpose(1, 2)  # (B, N, D)
    cls = visual.class_embedding.reshape(1, 1, -1).expand(x.shape[0], 1, -1)
    x = visual.ln_pre(torch.cat([cls, x], dim=1) + visual.positional_embedding)
    probs = []
    for block in visual.transformer.resblocks:
        x, p = _open_clip_block(block, x)
        probs.append(p)
    return visual.ln_post(x)[:, 0] @ visual.proj, probs


def _open_clip_text(model, ids):
    x = model.token_embedding(ids) + model.positional_embedding
    probs = []
    for block in model.transformer.resblocks:
        x, p = _open_clip_block(block, x, model.attn_mask)
        probs.append(p)
    x = model.ln_final(x)
    return x[torch.arange(x.shape[0]), ids.argmax(dim=-1)] @ model.text_projection, probs


def _timm_forward(model, pixels):
    assert model.reg_token is None and not model.no_embed_class and model.global_pool == "token"
    x = model.patch_embed(pixels)  # (B, N, D)
    x = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + model.pos_embed
    x = model.norm_pre(x)
    probs = []
    for block in model.blocks:
        a = block.attn
        h = block.norm1(x)
        B, n, _ = h.shape
        qkv = a.qkv(h).reshape(B, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = a.q_norm(qkv[0]), a.k_norm(qkv[1]), qkv[2]
        p = torch.softmax((q * a.scale) @ k.transpose(-2, -1), dim=-1)
        out = (p @ v).transpose(1, 2).reshape(B, n, -1)
        x = x + block.ls1(a.proj(a.norm(out)))
        x = x + block.ls2(block.mlp(block.norm2(x)))
        probs.append(p)
    x = model.norm(x)
    return model.head(model.fc_norm(x[:, 0])), probs


def _eager_double(model):
    ref = copy.deepcopy(model).double().eval()
    ref.set_attn_implementation("eager")
    return ref


# ------------------------------------------------------------------------------------------------
# classifier references: one image, one target, official batch-size-1 procedure
# ------------------------------------------------------------------------------------------------


def _classifier_reference(kind, adapter, images, target_indices):
    """{(image i, target index): (logits (C,), probs [L × (H,N,N)], grads [L × (H,N,N)])}."""
    model = adapter.model
    if kind == "timm":
        ref = copy.deepcopy(model).double().eval()
        mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]
        size = tuple(model.patch_embed.img_size)
    else:
        ref = _eager_double(model)
        mean = std = (0.5, 0.5, 0.5)
        size = (model.config.image_size, model.config.image_size)
    out = {}
    for i, image in enumerate(images):
        pixels = _pixels([image], size, mean, std).double()
        with torch.no_grad():  # the hand-written forward reproduces the model
            own = model(pixels.float()) if kind == "timm" else model(pixel_values=pixels.float()).logits
        for index in target_indices:
            if kind == "timm":
                logits, probs = _timm_forward(ref, pixels)
            else:
                output = ref(pixel_values=pixels, output_attentions=True)
                logits, probs = output.logits, list(output.attentions)
            torch.testing.assert_close(logits.float(), own, atol=1e-4, rtol=1e-4)
            one_hot = torch.zeros_like(logits)
            one_hot[0, index] = 1
            score = torch.sum(one_hot * logits)
            grads = torch.autograd.grad(score, probs)
            out[i, index] = (logits[0].detach(), [p[0].detach() for p in probs], [g[0] for g in grads])
    return out, size


CLASSIFIER_CASES = [("chefer", 0), ("chefer", 1), ("rollout", 0), ("rollout", 1), ("raw", None),
                    ("attn-gradcam", None)]


@pytest.fixture(scope="module")
def classifier_setup():
    """Both classifiers with their references (computed once: the reference does not depend on the method)."""
    images = _images()[:3]
    setups = {}
    for kind, make, targets in (("timm", _make_timm, ["2", "0"]), ("hf-vit", _make_hf_vit, ["LABEL_1", "3"])):
        adapter = make()
        indices = [adapter.labels.index(t) if t in adapter.labels else int(t) for t in targets]
        reference, size = _classifier_reference(kind, adapter, images, indices)
        setups[kind] = (adapter, images, targets, indices, reference, size)
    return setups


@pytest.mark.parametrize("kind", ["timm", "hf-vit"])
@pytest.mark.parametrize("method,start_layer", CLASSIFIER_CASES)
def test_classifier_maps_match_literal_reference(classifier_setup, kind, method, start_layer):
    from xattn_cli.explainers.relevancy import ClassifierRelevancy

    adapter, images, targets, indices, reference, size = classifier_setup[kind]
    grid = (size[0] // adapter.patch_size[0], size[1] // adapter.patch_size[1])
    prefix = 1
    results = ClassifierRelevancy(adapter, method=method, targets=targets, start_layer=start_layer).explain(images)
    assert len(results) == len(images)
    for i, (image, targets_out) in enumerate(zip(images, results)):
        assert len(targets_out) == len(indices)
        for target_map, index in zip(targets_out, indices):
            logits, probs, grads = reference[i, index]
            R = _relevance_literal(method, probs, grads, start_layer or 0)
            expected, degenerate = _map_literal(R[0, prefix:], grid, (image.height, image.width))
            _assert_map(target_map, expected, degenerate, ATOL_MAP)
            assert target_map.score == pytest.approx(float(logits[index]), abs=1e-5)
            assert target_map.extra["index"] == index
            assert target_map.extra["label"] == adapter.labels[index]
            assert target_map.extra["probability"] == pytest.approx(float(logits.softmax(-1)[index]), abs=1e-5)
            assert target_map.extra["predicted"] == adapter.labels[int(logits.argmax())]


def test_classifier_default_target_is_the_prediction(classifier_setup):
    from xattn_cli.explainers.relevancy import ClassifierRelevancy

    adapter, images, *_ = classifier_setup["hf-vit"]
    with torch.no_grad():
        logits = adapter.model(pixel_values=_pixels(images, (32, 32), (0.5,) * 3, (0.5,) * 3)).logits
    results = ClassifierRelevancy(adapter).explain(images)
    for row, targets_out in zip(logits, results):
        assert [t.extra["index"] for t in targets_out] == [int(row.argmax())]


# ------------------------------------------------------------------------------------------------
# CLIP: the official notebook's `interpret`, transcribed
# ------------------------------------------------------------------------------------------------


def _interpret_core(logits_per_image, image_probs, text_probs, batch_size, start_layer, start_layer_text):
    """The body of `interpret` (CLIP_explainability.ipynb) after the forward; probs are the blocks' attn_probs."""
    index = [i for i in range(batch_size)]
    one_hot = np.zeros((logits_per_image.shape[0], logits_per_image.shape[1]), dtype=np.float32)
    one_hot[torch.arange(logits_per_image.shape[0]), index] = 1
    one_hot = torch.from_numpy(one_hot).requires_grad_(True)
    one_hot = torch.sum(one_hot.to(logits_per_image.dtype) * logits_per_image)

    image_attn_blocks = image_probs
    if start_layer == -1:
        start_layer = len(image_attn_blocks) - 1
    num_tokens = image_attn_blocks[0].shape[-1]
    R = torch.eye(num_tokens, num_tokens, dtype=image_attn_blocks[0].dtype)
    R = R.unsqueeze(0).expand(batch_size, num_tokens, num_tokens)
    for i, attn_probs in enumerate(image_attn_blocks):
        if i < start_layer:
            continue
        grad = torch.autograd.grad(one_hot, [attn_probs], retain_graph=True)[0].detach()
        cam = attn_probs.detach()
        cam = cam.reshape(-1, cam.shape[-1], cam.shape[-1])
        grad = grad.reshape(-1, grad.shape[-1], grad.shape[-1])
        cam = grad * cam
        cam = cam.reshape(batch_size, -1, cam.shape[-1], cam.shape[-1])
        cam = cam.clamp(min=0).mean(dim=1)
        R = R + torch.bmm(cam, R)
    image_relevance = R[:, 0, 1:]

    text_attn_blocks = text_probs
    if start_layer_text == -1:
        start_layer_text = len(text_attn_blocks) - 1
    num_tokens = text_attn_blocks[0].shape[-1]
    R_text = torch.eye(num_tokens, num_tokens, dtype=text_attn_blocks[0].dtype)
    R_text = R_text.unsqueeze(0).expand(batch_size, num_tokens, num_tokens)
    for i, attn_probs in enumerate(text_attn_blocks):
        if i < start_layer_text:
            continue
        grad = torch.autograd.grad(one_hot, [attn_probs], retain_graph=True)[0].detach()
        cam = attn_probs.detach()
        cam = cam.reshape(-1, cam.shape[-1], cam.shape[-1])
        grad = grad.reshape(-1, grad.shape[-1], grad.shape[-1])
        cam = grad * cam
        cam = cam.reshape(batch_size, -1, cam.shape[-1], cam.shape[-1])
        cam = cam.clamp(min=0).mean(dim=1)
        R_text = R_text + torch.bmm(cam, R_text)
    text_relevance = R_text
    return text_relevance, image_relevance


def _clip_forward(kind, ref, images, tokens):
    """logits_per_image (K, K), cos (K, K), vision attn_probs, text attn_probs (all in the graph)."""
    if kind == "openclip":
        image_features, image_probs = _open_clip_image(ref, images)
        text_features, text_probs = _open_clip_text(ref, tokens["input_ids"])
    else:
        output = ref(pixel_values=images, input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                     output_attentions=True)
        image_features, text_features = output.image_embeds, output.text_embeds
        image_probs = list(output.vision_model_output.attentions)
        text_probs = list(output.text_model_output.attentions)
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    text_features = text_features / text_features.norm(dim=-1, keepdim=True)
    cos = image_features @ text_features.t()
    logits_per_image = ref.logit_scale.exp() * cos
    return logits_per_image, cos, image_probs, text_probs


def _eot(kind, ref, ids):
    if kind == "openclip":
        return ids.argmax(dim=-1)  # the notebook: CLS_idx = text_encoding.argmax(dim=-1)
    eos = ref.config.text_config.eos_token_id
    return ids.argmax(dim=-1) if eos == 2 else (ids == eos).int().argmax(dim=-1)  # where HF pools


def _clip_reference(kind, adapter, images, texts, start_layer=-1, start_layer_text=-1, method="chefer"):
    """Per image: the notebook's `interpret` (image repeated per text, diagonal one-hot).
    Returns {(i, k): (cos, map, degenerate, token relevances)}."""
    model = adapter.model
    if kind == "openclip":
        ref = copy.deepcopy(model).double().eval()
        tokens = {"input_ids": CharTokenizer()(texts)}
        size = model.visual.image_size
        patch = model.visual.patch_size
    else:
        ref = _eager_double(model)
        batch = adapter.tokenizer(texts, padding=True, return_tensors="pt")
        tokens = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        size, patch = model.config.vision_config.image_size, model.config.vision_config.patch_size
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    patch = tuple(patch) if isinstance(patch, (tuple, list)) else (patch, patch)
    grid = (size[0] // patch[0], size[1] // patch[1])
    eot = _eot(kind, ref, tokens["input_ids"])
    out = {}
    batch_size = len(texts)
    for i, image in enumerate(images):
        pixels = _pixels([image], size, OPENAI_MEAN, OPENAI_STD).double()
        repeated = pixels.repeat(batch_size, 1, 1, 1)
        logits_per_image, cos, image_probs, text_probs = _clip_forward(kind, ref, repeated, tokens)
        if i == 0:  # the hand-written / eager forward reproduces the model under test
            with torch.no_grad():
                own_image = adapter.encode_image(pixels.float())
                own_text = adapter.encode_tokens({k: v for k, v in tokens.items()})
            own = F.normalize(own_image, dim=-1) @ F.normalize(own_text, dim=-1).t()
            torch.testing.assert_close(cos[:1].float(), own, atol=1e-5, rtol=1e-5)
        if method == "chefer":
            R_text, R_image = _interpret_core(logits_per_image, image_probs, text_probs, batch_size,
                                              start_layer, start_layer_text)
        else:  # baselines on the same captured tensors, per text pair (row k of the repeated batch)
            one_hot = torch.sum(torch.eye(batch_size, dtype=logits_per_image.dtype) * logits_per_image)
            image_grads = torch.autograd.grad(one_hot, image_probs, retain_graph=True)
            text_grads = torch.autograd.grad(one_hot, text_probs, retain_graph=True)
            s_img = len(image_probs) - 1 if start_layer == -1 else start_layer
            s_txt = len(text_probs) - 1 if start_layer_text == -1 else start_layer_text
            R_image = torch.stack([
                _relevance_literal(method, [p[k].detach() for p in image_probs], [g[k] for g in image_grads],
                                   s_img)[0, 1:] for k in range(batch_size)])
            R_text = torch.stack([
                _relevance_literal(method, [p[k].detach() for p in text_probs], [g[k] for g in text_grads], s_txt)
                for k in range(batch_size)])
        for k in range(batch_size):
            image_map, degenerate = _map_literal(R_image[k], grid, (image.height, image.width))
            cls_idx = int(eot[k])
            row = R_text[k][cls_idx, 1:cls_idx]
            shown = row.clamp(min=0)  # as every model shows its tokens: each ÷ the largest (README, results.py)
            text_scores = (shown / shown.max()).flatten()
            out[i, k] = (float(cos[k, k].detach()), image_map, degenerate, text_scores.numpy())
    return out


def _check_clip(results, reference, images, texts, atol):
    assert len(results) == len(images)
    for i, targets_out in enumerate(results):
        assert [t.target for t in targets_out] == list(texts)
        for k, target_map in enumerate(targets_out):
            cos, image_map, degenerate, token_scores = reference[i, k]
            assert target_map.score == pytest.approx(cos, abs=1e-5)
            _assert_map(target_map, image_map, degenerate, atol)
            tokens = target_map.extra["tokens"]
            assert len(tokens) == len(token_scores)
            np.testing.assert_allclose([t["relevance"] for t in tokens], token_scores, atol=atol, rtol=0)


@pytest.fixture(scope="module")
def clip_adapters(hf_clip_folder):
    return {"openclip": _make_openclip(), "hf-clip": _make_hf_clip(hf_clip_folder)}


@pytest.mark.parametrize("kind", ["openclip", "hf-clip"])
@pytest.mark.parametrize("start_layer", [None, 0])
def test_clip_matches_official_notebook_interpret(clip_adapters, kind, start_layer):
    from xattn_cli.explainers.relevancy import ClipRelevancy

    adapter = clip_adapters[kind]
    images = _images()[:2]
    notebook_start = -1 if start_layer is None else start_layer
    reference = _clip_reference(kind, adapter, images, TEXTS, notebook_start, notebook_start)
    results = ClipRelevancy(adapter, TEXTS, method="chefer", start_layer=start_layer).explain(images)
    _check_clip(results, reference, images, TEXTS, ATOL_CLIP)


@pytest.mark.parametrize("method", ["rollout", "raw", "attn-gradcam"])
def test_clip_baselines_match_literal_reference(clip_adapters, method):
    from xattn_cli.explainers.relevancy import ClipRelevancy

    adapter = clip_adapters["openclip"]
    images = _images()[:2]
    reference = _clip_reference("openclip", adapter, images, TEXTS, -1, -1, method=method)
    results = ClipRelevancy(adapter, TEXTS, method=method).explain(images)
    _check_clip(results, reference, images, TEXTS, ATOL_CLIP)


# ------------------------------------------------------------------------------------------------
# pure functions on fabricated events
# ------------------------------------------------------------------------------------------------


def _random_events(seed, batch=2, heads=3, tokens=6, layers=3):
    from xattn_cli.capture import AttentionEvent

    g = torch.Generator().manual_seed(seed)
    events = []
    for layer in range(layers):
        probs = torch.softmax(2 * torch.randn(batch, heads, tokens, tokens, generator=g, dtype=torch.float64), -1)
        grad = torch.randn(batch, heads, tokens, tokens, generator=g, dtype=torch.float64)
        events.append(AttentionEvent("self", "vision", layer, probs, grad))
    return events


@pytest.mark.parametrize("start_layer", [0, 1, 2])
def test_relevance_functions_match_literal_loops(start_layer):
    from xattn_cli.methods.relevancy import (attention_gradcam, head_mean_positive, raw_attention, rollout,
                                             self_attention_relevance, token_relevance)

    events = _random_events(7 + start_layer)
    batch = events[0].probs.shape[0]
    for b in range(batch):
        probs = [e.probs[b] for e in events]
        grads = [e.grad[b] for e in events]
        heads = probs[0].shape[0]
        literal = sum(torch.clamp(grads[0][h] * probs[0][h], min=0) for h in range(heads)) / heads
        torch.testing.assert_close(head_mean_positive(events[0].probs, events[0].grad)[b].double(), literal)
        expected = {
            "chefer": _chefer_literal(probs, grads, start_layer),
            "rollout": _rollout_literal(probs, start_layer),
            "raw": _raw_literal(probs),
            "attn-gradcam": _gradcam_literal(probs, grads),
        }
        got = {
            "chefer": self_attention_relevance(events, start_layer=start_layer)[b],
            "rollout": rollout(events, start_layer=start_layer)[b],
            "raw": raw_attention(events)[b],
            "attn-gradcam": attention_gradcam(events)[b],
        }
        for method in expected:
            torch.testing.assert_close(got[method].double(), expected[method], atol=1e-10, rtol=1e-8,
                                       msg=lambda m, method=method: f"{method}: {m}")
            torch.testing.assert_close(token_relevance(method, events, start_layer=start_layer)[b].double(),
                                       expected[method], atol=1e-10, rtol=1e-8,
                                       msg=lambda m, method=method: f"token_relevance {method}: {m}")


# ------------------------------------------------------------------------------------------------
# handle_residual (spec §1.5)
# ------------------------------------------------------------------------------------------------


def _official_handle_residual(orig_self_attention):
    self_attention = orig_self_attention.clone()
    diag_idx = range(self_attention.shape[-1])
    self_attention -= torch.eye(self_attention.shape[-1]).to(self_attention)
    assert self_attention[diag_idx, diag_idx].min() >= 0
    self_attention = self_attention / self_attention.sum(dim=-1, keepdim=True)
    self_attention += torch.eye(self_attention.shape[-1]).to(self_attention)
    return self_attention


def test_handle_residual_matches_official():
    from xattn_cli.methods.relevancy import handle_residual

    g = torch.Generator().manual_seed(3)
    R = torch.eye(7, dtype=torch.float64) + 0.3 * torch.rand(3, 7, 7, generator=g, dtype=torch.float64)
    got = handle_residual(R)
    assert got.shape == R.shape
    expected = torch.stack([_official_handle_residual(R[b]) for b in range(R.shape[0])])
    torch.testing.assert_close(got.double(), expected, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(R, torch.eye(7, dtype=torch.float64) + 0.3 * torch.rand(
        3, 7, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64))  # input untouched


def test_handle_residual_zero_rows_stay_zero():
    from xattn_cli.methods.relevancy import handle_residual

    g = torch.Generator().manual_seed(4)
    eye = torch.eye(5, dtype=torch.float64)
    R = eye + 0.2 * torch.rand(2, 5, 5, generator=g, dtype=torch.float64)
    R[0, 2] = eye[2]  # row of R - I is zero
    R[1] = eye  # the whole matrix is I: every row of R - I is zero
    got = handle_residual(R).double()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[1], eye)
    torch.testing.assert_close(got[0, 2], eye[2])
    official = _official_handle_residual(R[0])  # NaN only in the zero row
    assert torch.isnan(official[2]).all()
    keep = [0, 1, 3, 4]
    torch.testing.assert_close(got[0, keep], official[keep], atol=1e-9, rtol=1e-9)


# ------------------------------------------------------------------------------------------------
# batches equal single-image runs (spec §6)
# ------------------------------------------------------------------------------------------------


def _assert_same(batch_results, single_results, tokens: bool):
    for batched, single in zip(batch_results, single_results):
        assert len(batched) == len(single)
        for a, b in zip(batched, single):
            assert a.target == b.target and a.degenerate == b.degenerate
            assert a.score == pytest.approx(b.score, abs=1e-5)
            np.testing.assert_allclose(a.map, b.map, atol=1e-5, rtol=0)
            if tokens:
                np.testing.assert_allclose([t["relevance"] for t in a.extra["tokens"]],
                                           [t["relevance"] for t in b.extra["tokens"]], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["timm", "hf-vit"])
def test_classifier_batch_equals_single_runs(kind):
    from xattn_cli.explainers.relevancy import ClassifierRelevancy

    adapter = _make_timm() if kind == "timm" else _make_hf_vit()
    images = _images()
    explainer = ClassifierRelevancy(adapter, method="chefer", targets=["1", "2"])
    batched = explainer.explain(images)
    single = [explainer.explain([image])[0] for image in images]
    _assert_same(batched, single, tokens=False)


@pytest.mark.parametrize("kind,start_layer", [("openclip", 0), ("hf-clip", None)])
def test_clip_batch_equals_single_runs(clip_adapters, kind, start_layer):
    from xattn_cli.explainers.relevancy import ClipRelevancy

    explainer = ClipRelevancy(clip_adapters[kind], TEXTS, method="chefer", start_layer=start_layer)
    images = _images()
    batched = explainer.explain(images)
    single = [explainer.explain([image])[0] for image in images]
    _assert_same(batched, single, tokens=True)


@pytest.mark.parametrize("kind", ["openclip", "hf-clip"])
@pytest.mark.parametrize("method", ["chefer", "rollout"])
def test_text_tower_runs_once_per_text(clip_adapters, kind, method):
    """One text pass per text, widened to the batch at the start block (the maps are checked above)."""
    from xattn_cli.explainers.relevancy import ClipRelevancy

    adapter = clip_adapters[kind]
    batch_sizes = []
    tokenize = adapter.tokenize
    adapter.tokenize = lambda texts: (batch_sizes.append(len(texts)), tokenize(texts))[1]
    try:
        ClipRelevancy(adapter, TEXTS, method=method).explain(_images()[:3])
    finally:
        del adapter.tokenize  # the class's method again
    assert batch_sizes == [1] * len(TEXTS)


# ------------------------------------------------------------------------------------------------
# the model is left as it was (and exceptions propagate)
# ------------------------------------------------------------------------------------------------


def _global_hook_counts():
    from torch.nn.modules import module as m

    names = ["_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
             "_global_backward_pre_hooks", "_global_module_registration_hooks"]
    return {n: len(getattr(m, n)) for n in names if hasattr(m, n)}


def _snapshot(kind, adapter):
    model = adapter.model
    params = dict(model.named_parameters())
    names = sorted(params)
    for j, name in enumerate(names):  # a mix of frozen and trainable parameters, as a user may have left it
        params[name].requires_grad_(j % 3 != 0)
    snap = {
        "modules": {name: module for name, module in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in params.items()},
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "training": {n: m.training for n, m in model.named_modules()},
        "globals": _global_hook_counts(),
        "grad_enabled": torch.is_grad_enabled(),
    }
    if kind == "openclip":
        blocks = list(model.visual.transformer.resblocks) + list(model.transformer.resblocks)
        snap["mha"] = [(block, block.attn) for block in blocks]
    if kind == "timm":
        for j, block in enumerate(model.blocks):  # mixed flags, both must come back
            block.attn.fused_attn = j % 2 == 0
        snap["fused"] = [block.attn.fused_attn for block in model.blocks]
    if kind in ("hf-vit", "hf-clip"):
        snap["attn_impl"] = _hf_impls(model)
    return snap


def _hf_impls(model):
    impls = {"config": model.config._attn_implementation}
    for sub in ("vision_config", "text_config"):
        if hasattr(model.config, sub):
            impls[sub] = getattr(model.config, sub)._attn_implementation
    for name, module in model.named_modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            impls[name] = config._attn_implementation
    return impls


def _assert_restored(kind, adapter, snap):
    model = adapter.model
    for name, module in model.named_modules():
        assert not module._forward_hooks, f"forward hook left on {name}"
        assert not module._forward_pre_hooks, f"forward pre-hook left on {name}"
        assert not module._backward_hooks, f"backward hook left on {name}"
        assert not getattr(module, "_backward_pre_hooks", None), f"backward pre-hook left on {name}"
        assert "forward" not in vars(module), f"forward patched on {name}"
    current = dict(model.named_modules())
    assert current.keys() == snap["modules"].keys()
    for name, module in current.items():
        assert module is snap["modules"][name], f"module {name} replaced"
        assert module.training == snap["training"][name]
    for name, p in model.named_parameters():
        assert p.requires_grad == snap["requires_grad"][name], f"requires_grad of {name} changed"
        assert p.grad is None, f"{name}.grad was left set"
        assert not getattr(p, "_backward_hooks", None), f"tensor hook left on {name}"
    state = model.state_dict()
    assert state.keys() == snap["state"].keys()
    for key, value in snap["state"].items():
        assert torch.equal(state[key], value), f"{key} changed"
    assert _global_hook_counts() == snap["globals"]
    assert torch.is_grad_enabled() == snap["grad_enabled"]
    if kind == "openclip":
        for block, attn in snap["mha"]:
            assert block.attn is attn and type(attn) is torch.nn.MultiheadAttention
    if kind == "timm":
        assert [block.attn.fused_attn for block in model.blocks] == snap["fused"]
    if kind in ("hf-vit", "hf-clip"):
        assert _hf_impls(model) == snap["attn_impl"]


RESTORE_CASES = [("openclip", None), ("timm", None), ("hf-vit", "sdpa"), ("hf-vit", "eager"),
                 ("hf-clip", "sdpa"), ("hf-clip", "eager")]


def _fresh(kind, attn, hf_clip_folder):
    if kind == "openclip":
        return _make_openclip()
    if kind == "timm":
        return _make_timm()
    if kind == "hf-vit":
        return _make_hf_vit(attn)
    return _make_hf_clip(hf_clip_folder, attn)


def _explainer(kind, adapter, method="chefer"):
    from xattn_cli.explainers.relevancy import ClassifierRelevancy, ClipRelevancy

    if kind in ("openclip", "hf-clip"):
        return ClipRelevancy(adapter, TEXTS[:2], method=method, start_layer=0)
    return ClassifierRelevancy(adapter, method=method, targets=["1"])


def _run_model(kind, adapter, pixels):
    if kind == "openclip":
        return adapter.model.encode_image(pixels)
    if kind == "hf-clip":
        return adapter.model.get_image_features(pixel_values=pixels)
    return adapter.classify(pixels)


def _last_module(kind, model):
    return {"openclip": lambda: model.visual.ln_post, "timm": lambda: model.norm,
            "hf-vit": lambda: model.vit.layernorm, "hf-clip": lambda: model.vision_model.post_layernorm}[kind]()


def _some_pixels(kind, adapter):
    size = adapter.native_size
    return torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))


def _output_tensor(output):
    return output if torch.is_tensor(output) else output.pooler_output


@pytest.mark.parametrize("kind,attn", RESTORE_CASES)
def test_recording_does_not_change_the_forward(hf_clip_folder, kind, attn):
    """Inside the recorder the model computes what it computes outside it; recorded text attention is
    causal and ignores padding (a lost mask would change the embeddings, scores and every map)."""
    from xattn_cli.capture import AttentionRecorder

    adapter = _fresh(kind, attn, hf_clip_folder)
    pixels = _some_pixels(kind, adapter)
    tokens = adapter.tokenize(TEXTS) if kind in ("openclip", "hf-clip") else None
    with torch.no_grad():
        image_out = _output_tensor(_run_model(kind, adapter, pixels))
        text_out = adapter.encode_tokens(tokens) if tokens is not None else None
    with AttentionRecorder(adapter.attention_sites()) as recording:
        image_in = _output_tensor(_run_model(kind, adapter, pixels.clone().requires_grad_(True)))
        text_in = adapter.encode_tokens(tokens) if tokens is not None else None
    torch.testing.assert_close(image_in.detach(), image_out, atol=1e-5, rtol=1e-5, msg="image tower changed")
    if tokens is None:
        return
    text_events = recording.select(stream="text")
    assert text_events
    ids = tokens["input_ids"]
    valid = tokens.get("attention_mask", torch.ones_like(ids)).bool()
    for event in text_events:
        probs = event.probs.detach()
        upper = torch.triu(probs, diagonal=1).abs().max()
        assert upper <= 1e-6, f"text layer {event.layer}: attention to later tokens (no causal mask), {upper:.3g}"
        padded = probs.masked_select(~valid[:, None, None, :].expand_as(probs) & torch.tril(
            torch.ones_like(probs, dtype=torch.bool)))
        assert padded.numel() == 0 or padded.abs().max() <= 1e-6, \
            f"text layer {event.layer}: attention to padding"
    torch.testing.assert_close(text_in.detach(), text_out, atol=1e-5, rtol=1e-5, msg="text tower changed")


@pytest.mark.parametrize("kind,attn", RESTORE_CASES)
def test_explain_leaves_model_as_it_was(hf_clip_folder, kind, attn):
    adapter = _fresh(kind, attn, hf_clip_folder)
    snap = _snapshot(kind, adapter)
    pixels = _some_pixels(kind, adapter)
    with torch.no_grad():
        before = _output_tensor(_run_model(kind, adapter, pixels))
    for method in ("chefer", "raw"):
        _explainer(kind, adapter, method).explain(_images()[:2])
        _assert_restored(kind, adapter, snap)
    with torch.no_grad():
        after = _output_tensor(_run_model(kind, adapter, pixels))
    assert torch.equal(before, after)


class _Boom(RuntimeError):
    pass


@pytest.mark.parametrize("kind,attn", RESTORE_CASES)
def test_recorder_restores_and_propagates_on_error(hf_clip_folder, kind, attn):
    from xattn_cli.capture import AttentionRecorder

    adapter = _fresh(kind, attn, hf_clip_folder)
    snap = _snapshot(kind, adapter)
    pixels = _some_pixels(kind, adapter)

    # 1. an exception raised inside the forward (after every vision attention ran)
    def explode(*_):
        raise _Boom("inside forward")

    handle = _last_module(kind, adapter.model).register_forward_hook(explode)
    try:
        with pytest.raises(_Boom, match="inside forward"):
            with AttentionRecorder(adapter.attention_sites()):
                _run_model(kind, adapter, pixels.requires_grad_(True))
    finally:
        handle.remove()
    _assert_restored(kind, adapter, snap)

    # 2. an exception in the body after a complete forward, before backward
    with pytest.raises(_Boom, match="after forward"):
        with AttentionRecorder(adapter.attention_sites()) as recording:
            _output_tensor(_run_model(kind, adapter, pixels)).sum()
            assert recording.select(stream="vision"), "nothing recorded"
            raise _Boom("after forward")
    _assert_restored(kind, adapter, snap)

    # 3. an exception raised inside the model while an explainer runs
    handle = _last_module(kind, adapter.model).register_forward_hook(explode)
    try:
        with pytest.raises(_Boom, match="inside forward"):
            _explainer(kind, adapter).explain(_images()[:1])
    finally:
        handle.remove()
    _assert_restored(kind, adapter, snap)

    # and the recorder still works afterwards: events with gradients, in layer order
    with AttentionRecorder(adapter.attention_sites()) as recording:
        _output_tensor(_run_model(kind, adapter, pixels.detach().requires_grad_(True))).sum().backward()
    events = recording.select(stream="vision")
    assert [e.layer for e in events] == sorted(e.layer for e in events) and events
    assert all(e.grad is not None and e.grad.shape == e.probs.shape for e in events)
    for p in adapter.model.parameters():  # this test's own backward: clear before the final check
        p.grad = None
    _assert_restored(kind, adapter, snap)
