"""Independent reference tests for co-attention and encoder-decoder relevancy
(shared/reference/chefer-relevancy.md §1.2-1.5, §2.3-2.5, §6).

Each reference is a slow, literal, per-sample transcription of the paper's rules as the official code
applies them (hila-chefer/Transformer-MM-Explainability: lxmert `GeneratorOurs.generate_ours`, VisualBERT
`SelfAttentionGenerator.generate_ours`, DETR `Generator.generate_ours`; `avg_heads`, `handle_residual`),
written without calling the package's rule functions.

Attention probabilities and their gradients are captured WITHOUT the package's recorder:
  * LXMERT: each `LxmertAttention.forward` of a float64 copy is replaced by a literal one that keeps its
    probabilities in call order (HF's `output_attentions` returns only one cross direction);
  * VisualBERT, DETR: `output_attentions=True` on an eager float64 copy, gradients by autograd.grad;
  * CrossAttention: the probabilities the module itself returns.
The reference runs each sample alone, unpadded; the package runs batches (padded questions) and must match.
Where the official eqs. 8+9 divide 0 by 0 (a row of R − I never updated), the reference uses the guard the
spec recommends (§1.5, §6) and says so; `test_rule_10_keeps_defined_rows_where_the_official_code_gives_nan`
pins down that deviation.
"""
from __future__ import annotations

import copy
import math
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from helpers import assert_batch_equals_single_runs
from test_relevancy_reference import _perturb

WORDS = "[PAD] [UNK] [CLS] [SEP] [MASK] what colour is the star circle square red blue green ? shape there a".split()
QUESTIONS = ["what colour is the star ?", "is there a red circle ?", "what shape ?"]
ANSWERS = ["red", "green", "blue", "yes", "no", "star"]
GRID, CELL = (3, 3), 4  # region features: 9 cells, 48 numbers each
TIGHT = dict(rtol=1e-7, atol=1e-10)  # float64 package vs float64 reference
ATOL_MAP = 1e-5  # float32 explainer maps/tokens vs float64 reference


# ------------------------------------------------------------------------------------------------
# tiny models and inputs
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    import transformers

    folder = tmp_path_factory.mktemp("vocab")
    (folder / "vocab.txt").write_text("\n".join(WORDS))
    return transformers.BertTokenizer(str(folder / "vocab.txt"))


def _lxmert_model(seed: int = 0):
    import transformers

    config = transformers.LxmertConfig(
        vocab_size=len(WORDS), hidden_size=32, num_attention_heads=2, intermediate_size=64, l_layers=2, x_layers=3,
        r_layers=1, visual_feat_dim=3 * CELL * CELL, visual_pos_dim=4, num_qa_labels=len(ANSWERS),
        max_position_embeddings=32, id2label=dict(enumerate(ANSWERS)))
    torch.manual_seed(seed)
    return _perturb(transformers.LxmertForQuestionAnswering(config), seed + 100, scale=0.1)


def _visualbert_model(seed: int = 1):
    import transformers

    config = transformers.VisualBertConfig(
        vocab_size=len(WORDS), hidden_size=32, num_attention_heads=2, intermediate_size=64, num_hidden_layers=3,
        visual_embedding_dim=3 * CELL * CELL, num_labels=len(ANSWERS), max_position_embeddings=32,
        id2label=dict(enumerate(ANSWERS)))
    torch.manual_seed(seed)
    return _perturb(transformers.VisualBertForQuestionAnswering(config), seed + 100, scale=0.1)


def _detr_model(seed: int = 2):
    import transformers

    backbone = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                         layer_type="basic", out_features=["stage2"])
    config = transformers.DetrConfig(
        backbone_config=backbone, use_timm_backbone=False, use_pretrained_backbone=False, d_model=32,
        encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=6, num_labels=4,
        id2label={0: "circle", 1: "square", 2: "star", 3: "ring"})
    torch.manual_seed(seed)
    model = _perturb(transformers.DetrForObjectDetection(config), seed + 100, scale=0.15)
    _perturb(model.model.decoder, seed + 200, scale=0.5)  # distinct queries: decoder self-attention matters
    _perturb(model.model.query_position_embeddings, seed + 300, scale=1.0)
    return model


DETR_SIZE = (40, 48)  # (H, W) → a 5 × 6 feature map


def _adapter(family: str, tokenizer):
    from xattn_cli.models.detr import DetrAdapter
    from xattn_cli.models.lxmert import LxmertAdapter
    from xattn_cli.models.regions import GridRegions
    from xattn_cli.models.visualbert import VisualBertAdapter

    if family == "lxmert":
        return LxmertAdapter(_lxmert_model(), tokenizer, GridRegions(GRID, CELL))
    if family == "visualbert":
        return VisualBertAdapter(_visualbert_model(), tokenizer, GridRegions(GRID, CELL))
    return DetrAdapter(_detr_model(), size=DETR_SIZE)


def _images() -> list[Image.Image]:
    from xattn_cli.world.shapes import scene_at

    images = [scene_at(21, i, size=48).image for i in range(3)]
    images[1] = images[1].resize((56, 40))  # non-square, catches transposed maps
    images[2] = images[2].resize((30, 44))
    return images


def _regions(images):
    from xattn_cli.models.regions import GridRegions

    return GridRegions(GRID, CELL)(images)


# ------------------------------------------------------------------------------------------------
# the literal rules (reference §1.2-1.5; official code, one sample, no guards)
# ------------------------------------------------------------------------------------------------


def _avg_heads(cam: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Rule 5, one sample: (1/H) Σ_h max(0, ∇A_h ⊙ A_h). (H, N, M) → (N, M)."""
    total = torch.zeros(cam.shape[1:], dtype=torch.float64)
    for h in range(cam.shape[0]):
        total += torch.clamp(grad[h].double() * cam[h].double(), min=0)
    return total / cam.shape[0]


def _handle_residual_official(r: torch.Tensor) -> torch.Tensor:
    """Eqs. 8+9 exactly as the official code: no epsilon, no guard."""
    eye = torch.eye(r.shape[-1], dtype=torch.float64)
    hat = r.clone() - eye
    assert hat.diagonal().min() >= 0
    hat = hat / hat.sum(dim=-1, keepdim=True)
    return hat + eye


def _handle_residual_guarded(r: torch.Tensor) -> torch.Tensor:
    """The official eqs. 8+9 with the guard the reference recommends (§1.5, §6): a row of R − I that sums to
    zero (never updated, e.g. a query whose Ā row is all zero) stays zero instead of 0/0 = NaN."""
    eye = torch.eye(r.shape[-1], dtype=torch.float64)
    hat = r.clone() - eye
    assert hat.diagonal().min() >= 0
    for row in range(hat.shape[0]):
        total = hat[row].sum()
        if total != 0:
            hat[row] = hat[row] / total
    return hat + eye


def _mm_rules(r_ss, r_qq, r_qs, cam_sq):
    """Rules 10+11 (LXMERT `apply_mm_attention_rules`)."""
    r_sq_addition = torch.matmul(_handle_residual_guarded(r_ss).t(), torch.matmul(cam_sq, _handle_residual_guarded(r_qq)))
    r_ss_addition = torch.matmul(cam_sq, r_qs)
    return r_sq_addition, r_ss_addition


def _self_rules_literal(r_ss, r_sq, cam, grad):
    """Rules 6+7 (`apply_self_attention_rules`): both additions from the old matrices, then added."""
    a = _avg_heads(cam, grad)
    r_ss_addition, r_sq_addition = a @ r_ss, a @ r_sq
    return r_ss + r_ss_addition, r_sq + r_sq_addition


def _bimodal_literal(language, relation, cross, text_tokens, image_tokens):
    """LXMERT `generate_ours` (use_lrp=False, normalisation on, rule 10 with self) for one sample.

    language, relation: per layer (A, ∇A) of the text / image self-attention layers; cross: per
    cross-modality layer a dict with (A, ∇A) for "t2v", "v2t", "lang", "visn".
    """
    r_tt = torch.eye(text_tokens, dtype=torch.float64)
    r_ii = torch.eye(image_tokens, dtype=torch.float64)
    r_ti = torch.zeros(text_tokens, image_tokens, dtype=torch.float64)
    r_it = torch.zeros(image_tokens, text_tokens, dtype=torch.float64)
    for cam, grad in language:
        r_tt, r_ti = _self_rules_literal(r_tt, r_ti, cam, grad)
    for cam, grad in relation:
        r_ii, r_it = _self_rules_literal(r_ii, r_it, cam, grad)
    for i, layer in enumerate(cross):
        if i == len(cross) - 1:
            break
        r_ti_addition, r_tt_addition = _mm_rules(r_tt, r_ii, r_it, _avg_heads(*layer["t2v"]))
        r_it_addition, r_ii_addition = _mm_rules(r_ii, r_tt, r_ti, _avg_heads(*layer["v2t"]))
        r_ti, r_tt = r_ti + r_ti_addition, r_tt + r_tt_addition
        r_it, r_ii = r_it + r_it_addition, r_ii + r_ii_addition
        r_tt, r_ti = _self_rules_literal(r_tt, r_ti, *layer["lang"])
        r_ii, r_it = _self_rules_literal(r_ii, r_it, *layer["visn"])
    # the last cross-modality layer: text side only (nothing else reaches [CLS])
    r_ti_addition, r_tt_addition = _mm_rules(r_tt, r_ii, r_it, _avg_heads(*cross[-1]["t2v"]))
    r_ti, r_tt = r_ti + r_ti_addition, r_tt + r_tt_addition
    r_tt, r_ti = _self_rules_literal(r_tt, r_ti, *cross[-1]["lang"])
    r_tt[0, 0] = 0
    return r_tt, r_ti


def _single_stream_literal(layers, pooled: int):
    """VisualBERT `generate_ours`: R = I; R += avg_heads(A, ∇A) R per layer; row `pooled`, self entry 0."""
    n = layers[0][0].shape[-1]
    r = torch.eye(n, dtype=torch.float64)
    for cam, grad in layers:
        r = r + _avg_heads(cam, grad) @ r
    row = r[pooled].clone()
    row[pooled] = 0
    return row


def _encoder_decoder_literal(encoder, decoder_self, decoder_cross, query: int, residual: str = "guarded"):
    """DETR `generate_ours` for one query, eqs. 8+9 guarded or `residual="official"` (no guard, the NaNs of
    each rule-10 addition set to 0); also reports whether the official, unguarded normalisation gave NaN
    (and so dropped a whole rule-10 addition)."""
    normalise = _handle_residual_official if residual == "official" else _handle_residual_guarded
    tokens, queries = encoder[0][0].shape[-1], decoder_self[0][0].shape[-1]
    r_ii = torch.eye(tokens, dtype=torch.float64)
    r_qq = torch.eye(queries, dtype=torch.float64)
    r_qi = torch.zeros(queries, tokens, dtype=torch.float64)
    had_nan = False
    for cam, grad in encoder:
        r_ii += _avg_heads(cam, grad) @ r_ii
    for (self_cam, self_grad), (cross_cam, cross_grad) in zip(decoder_self, decoder_cross):
        r_qq, r_qi = _self_rules_literal(r_qq, r_qi, self_cam, self_grad)
        cam = _avg_heads(cross_cam, cross_grad)
        had_nan |= bool(torch.isnan(_handle_residual_official(r_qq).t() @ cam @ _handle_residual_official(r_ii)).any())
        addition = normalise(r_qq).t() @ cam @ normalise(r_ii)
        addition[torch.isnan(addition)] = 0
        r_qi += addition
    return r_qi[query], had_nan


def _last_layer_literal(method: str, cam: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Reference §3, one sample's (H, N, M) last-layer attention: raw = heads averaged, no gradient;
    attn-gradcam = each head weighted by the spatial mean of its gradient, averaged, positive part."""
    if method == "raw":
        return cam.mean(dim=0)
    weights = grad.mean(dim=[1, 2], keepdim=True)
    return (cam * weights).mean(dim=0).clamp(min=0)


def _map_literal(values: torch.Tensor, grid, size) -> np.ndarray:
    """(N,) → (1, 1, gh, gw) → bilinear (align_corners=False) to (H, W) → min-max."""
    up = F.interpolate(values.double().reshape(1, 1, *grid), size=size, mode="bilinear", align_corners=False)[0, 0]
    return ((up - up.min()) / (up.max() - up.min())).numpy()


def _unit_literal(values: torch.Tensor) -> np.ndarray:
    values = values.double()
    return ((values - values.min()) / (values.max() - values.min())).numpy()


# ------------------------------------------------------------------------------------------------
# independent capture: LXMERT (literal attention forwards), VisualBERT and DETR (output_attentions)
# ------------------------------------------------------------------------------------------------


def _literal_lxmert_attention(module, calls: list):
    def forward(self, hidden_states, context, attention_mask=None, output_attentions=False):
        heads, width = self.num_attention_heads, self.attention_head_size
        batch, n, m = hidden_states.shape[0], hidden_states.shape[1], context.shape[1]
        q = self.query(hidden_states).reshape(batch, n, heads, width).permute(0, 2, 1, 3)
        k = self.key(context).reshape(batch, m, heads, width).permute(0, 2, 1, 3)
        v = self.value(context).reshape(batch, m, heads, width).permute(0, 2, 1, 3)
        scores = q @ k.transpose(-1, -2) / math.sqrt(width)
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = torch.softmax(scores, dim=-1)
        calls.append(probs)
        out = (probs @ v).permute(0, 2, 1, 3).reshape(batch, n, heads * width)
        return (out, probs) if output_attentions else (out,)

    return types.MethodType(forward, module)


def _lxmert_captured(model, tokenizer, question: str, image: Image.Image, answer: int | None = None):
    """One sample on a float64 copy: per layer (A, ∇A) of the language and relation layers, the cross
    layers' dicts ("t2v", "v2t", "lang", "visn"), the token and region counts, and the answer."""
    model = copy.deepcopy(model).double()
    calls = {}
    for module in model.modules():
        if type(module).__name__ == "LxmertAttention":
            module.forward = _literal_lxmert_attention(module, calls.setdefault(module, []))
    tokens = tokenizer([question], return_tensors="pt")
    regions = _regions([image])
    logits = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                   token_type_ids=tokens["token_type_ids"], visual_feats=regions.features.double(),
                   visual_pos=regions.boxes.double(), visual_attention_mask=regions.mask.double()).question_answering_score
    answer = int(logits[0].argmax()) if answer is None else answer
    recorded = [(module, k, probs) for module, probs_list in calls.items() for k, probs in enumerate(probs_list)]
    grads = torch.autograd.grad(logits[0, answer], [p for _, _, p in recorded], allow_unused=True)
    found = {(module, k): (probs[0].detach(), None if g is None else g[0]) for (module, k, probs), g in zip(recorded, grads)}
    encoder = model.lxmert.encoder
    language = [found[(layer.attention.self, 0)] for layer in encoder.layer]
    relation = [found[(layer.attention.self, 0)] for layer in encoder.r_layers]
    cross = [{"t2v": found[(x.visual_attention.att, 0)], "v2t": found[(x.visual_attention.att, 1)],
              "lang": found[(x.lang_self_att.self, 0)], "visn": found[(x.visn_self_att.self, 0)]}
             for x in encoder.x_layers]  # HF's cross_att calls the shared module for text first
    return language, relation, cross, tokens["input_ids"].shape[1], regions.features.shape[1], answer


def _lxmert_reference(model, tokenizer, question: str, image: Image.Image, answer: int | None = None):
    """One sample: (R_tt[0], R_ti[0], answer) by the literal rules on a float64 copy."""
    *captured, answer = _lxmert_captured(model, tokenizer, question, image, answer)
    r_tt, r_ti = _bimodal_literal(*captured)
    return r_tt[0], r_ti[0], answer


def _visualbert_captured(model, tokenizer, question: str, image: Image.Image, answer: int | None = None):
    """One sample on a float64 copy: per layer (A, ∇A), the pooled position, the text length, the answer."""
    model = copy.deepcopy(model).double()
    tokens = tokenizer([question], return_tensors="pt")
    regions = _regions([image])
    output = model(**tokens, visual_embeds=regions.features.double(), visual_attention_mask=regions.mask.double(),
                   output_attentions=True)
    answer = int(output.logits[0].argmax()) if answer is None else answer
    grads = torch.autograd.grad(output.logits[0, answer], output.attentions)
    pooled = int(tokens["attention_mask"].sum()) - 2  # MMF's pooler_strategy "vqa"
    layers = [(a[0].detach(), g[0]) for a, g in zip(output.attentions, grads)]
    return layers, pooled, tokens["input_ids"].shape[1], answer


def _visualbert_reference(model, tokenizer, question: str, image: Image.Image, answer: int | None = None):
    layers, pooled, text, answer = _visualbert_captured(model, tokenizer, question, image, answer)
    row = _single_stream_literal(layers, pooled)
    return row[:text], row[text:], answer


def _detr_pixels(images) -> torch.Tensor:
    """Squash to DETR_SIZE, bicubic, ImageNet statistics. (B, 3, H, W)."""
    height, width = DETR_SIZE
    out = []
    for image in images:
        arr = np.asarray(image.convert("RGB").resize((width, height), Image.BICUBIC), dtype=np.float32) / 255.0
        t = torch.from_numpy(arr).permute(2, 0, 1)
        out.append((t - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1))
    return torch.stack(out)


def _detr_captured(model, image: Image.Image, query: int):
    """One query on a float64 copy: per layer (A, ∇A) of the encoder, decoder self and decoder cross
    attention, and the query's label."""
    model = copy.deepcopy(model).double()
    model.set_attn_implementation("eager")
    output = model(pixel_values=_detr_pixels([image]).double(), output_attentions=True)
    label = int(output.logits[0, query, :-1].argmax())
    maps = list(output.encoder_attentions) + list(output.decoder_attentions) + list(output.cross_attentions)
    grads = torch.autograd.grad(output.logits[0, query, label], maps)
    pairs = [(a[0].detach(), g[0]) for a, g in zip(maps, grads)]
    layers = len(output.encoder_attentions)
    decoder = len(output.decoder_attentions)
    return pairs[:layers], pairs[layers:layers + decoder], pairs[layers + decoder:], label


def _detr_reference(model, image: Image.Image, query: int, residual: str = "guarded"):
    encoder, decoder_self, decoder_cross, label = _detr_captured(model, image, query)
    row, had_nan = _encoder_decoder_literal(encoder, decoder_self, decoder_cross, query, residual)
    return row, label, had_nan


# ------------------------------------------------------------------------------------------------
# VQA: LXMERT and VisualBERT, batch 1 and batch 3, matrices and explainer outputs
# ------------------------------------------------------------------------------------------------


def _package_rows(adapter, tokenizer, questions, images, answer: str | None = None):
    """The package's relevance rows on a float64 copy: logits, answers, text rows, region rows."""
    from xattn_cli.explainers.vqa import VqaRelevancy

    adapter64 = copy.deepcopy(adapter)
    adapter64.model.double()
    batch = adapter64.tokenize(questions)
    regions = _regions(images)
    regions.features, regions.boxes, regions.mask = regions.features.double(), regions.boxes.double(), regions.mask.double()
    return batch, VqaRelevancy(adapter64, questions[:1], answer=answer).relevance(batch, regions)


@pytest.mark.parametrize("family", ["lxmert", "visualbert"])
@pytest.mark.parametrize("count", [1, 3])
def test_vqa_relevance_equals_literal_reference(tokenizer, family, count):
    adapter = _adapter(family, tokenizer)
    images, questions = _images()[:count], QUESTIONS[:count]
    batch, (logits, answers, text_rows, region_rows) = _package_rows(adapter, tokenizer, questions, images)
    reference = _lxmert_reference if family == "lxmert" else _visualbert_reference
    for i, (question, image) in enumerate(zip(questions, images)):
        ref_text, ref_regions, ref_answer = reference(adapter.model, tokenizer, question, image)
        length = int(batch["attention_mask"][i].sum())
        assert answers[i] == ref_answer
        assert float(ref_regions.max()) > 1e-3 and float(ref_text.max()) > 1e-3, "degenerate test model"
        torch.testing.assert_close(text_rows[i, :length], ref_text, **TIGHT)
        torch.testing.assert_close(region_rows[i], ref_regions, **TIGHT)
        assert torch.all(text_rows[i, length:] == 0), "padding must stay inert"


@pytest.mark.parametrize("family", ["lxmert", "visualbert"])
def test_vqa_relevance_of_a_chosen_answer(tokenizer, family):
    """`answer=` explains that answer for every sample, whatever the model predicts."""
    adapter = _adapter(family, tokenizer)
    images, questions = _images(), QUESTIONS
    batch, (logits, answers, text_rows, region_rows) = _package_rows(adapter, tokenizer, questions, images, "star")
    assert answers == [ANSWERS.index("star")] * 3 and any(int(row.argmax()) != answers[0] for row in logits)
    reference = _lxmert_reference if family == "lxmert" else _visualbert_reference
    for i, (question, image) in enumerate(zip(questions, images)):
        ref_text, ref_regions, _ = reference(adapter.model, tokenizer, question, image, answer=answers[0])
        length = int(batch["attention_mask"][i].sum())
        torch.testing.assert_close(text_rows[i, :length], ref_text, **TIGHT)
        torch.testing.assert_close(region_rows[i], ref_regions, **TIGHT)


@pytest.mark.parametrize("family", ["lxmert", "visualbert"])
def test_vqa_explainer_maps_equal_reference(tokenizer, family):
    """float32 explainer: region map = bilinear grid relevance at image size, min-max; token relevance =
    the answer row over the question's words (between [CLS] and [SEP]), each ÷ the largest, as every model
    shows its tokens."""
    from xattn_cli.explainers.vqa import VqaRelevancy

    adapter = _adapter(family, tokenizer)
    images = _images()
    results = VqaRelevancy(adapter, QUESTIONS[:2]).explain(images)
    reference = _lxmert_reference if family == "lxmert" else _visualbert_reference
    for i, image in enumerate(images):
        assert [t.target for t in results[i]] == QUESTIONS[:2]
        for question, target in zip(QUESTIONS[:2], results[i]):
            ref_text, ref_regions, ref_answer = reference(adapter.model, tokenizer, question, image)
            assert target.extra["answer"] == ANSWERS[ref_answer] and target.extra["question"] == question
            expected = _map_literal(ref_regions, GRID, (image.height, image.width))
            assert target.map.shape == (image.height, image.width) and target.map.dtype == np.float32
            np.testing.assert_allclose(target.map, expected, atol=ATOL_MAP, rtol=0)
            ids = tokenizer([question])["input_ids"][0]
            words = tokenizer.convert_ids_to_tokens(ids)
            keep = slice(1, len(ids) - 1)
            shown = ref_text[keep].double().clamp(min=0)
            assert [t["token"] for t in target.extra["tokens"]] == words[keep]
            np.testing.assert_allclose([t["relevance"] for t in target.extra["tokens"]], (shown / shown.max()).numpy(),
                                       atol=ATOL_MAP)
            assert [r["relevance"] for r in target.extra["regions"]] == pytest.approx(
                list(_unit_literal(ref_regions)), abs=ATOL_MAP)


def _vqa_baseline_reference(family: str, method: str, model, tokenizer, question: str, image: Image.Image,
                            answer: int | None):
    """One sample's (text row, region row, answer) under a last-layer baseline, literally."""
    if family == "lxmert":
        _, _, cross, _, _, answer = _lxmert_captured(model, tokenizer, question, image, answer)
        text = _last_layer_literal(method, *cross[-1]["lang"])[0].clone()
        text[0] = 0
        return text, _last_layer_literal(method, *cross[-1]["t2v"])[0], answer
    layers, pooled, length, answer = _visualbert_captured(model, tokenizer, question, image, answer)
    row = _last_layer_literal(method, *layers[-1])[pooled].clone()
    row[pooled] = 0
    return row[:length], row[length:], answer


@pytest.mark.parametrize("family", ["lxmert", "visualbert"])
@pytest.mark.parametrize("method", ["raw", "attn-gradcam"])
def test_vqa_baselines_equal_literal_reference(tokenizer, family, method):
    """Batch of three padded questions against each sample alone, float64, for the predicted answers and
    for a chosen one (the tiny LXMERT's predicted answers pull every head's mean gradient below zero, which
    attn-gradcam clamps to an all-zero map). attn-gradcam's head weights must ignore padded keys: their
    probability is zero, their gradient is not."""
    from xattn_cli.explainers.vqa import VqaRelevancy

    adapter64 = copy.deepcopy(_adapter(family, tokenizer))
    adapter64.model.double()
    images = _images()
    batch = adapter64.tokenize(QUESTIONS)
    regions = _regions(images)
    regions.features, regions.boxes, regions.mask = regions.features.double(), regions.boxes.double(), regions.mask.double()
    peaks = []
    for answer in (None, "blue"):
        explainer = VqaRelevancy(adapter64, QUESTIONS[:1], method=method, answer=answer)
        _, answers, text_rows, region_rows = explainer.relevance(batch, regions)
        for i, (question, image) in enumerate(zip(QUESTIONS, images)):
            ref_text, ref_regions, ref_answer = _vqa_baseline_reference(
                family, method, adapter64.model, tokenizer, question, image, explainer.fixed_answer)
            length = int(batch["attention_mask"][i].sum())
            assert answers[i] == ref_answer
            peaks.append(float(ref_regions.max()))
            torch.testing.assert_close(text_rows[i, :length].double(), ref_text, **TIGHT)
            torch.testing.assert_close(region_rows[i].double(), ref_regions, **TIGHT)
    assert max(peaks) > 1e-6, "degenerate test model"  # TIGHT's atol is 1e-10


def test_lxmert_records_both_cross_directions(tokenizer):
    """The recorder sees vision→text as well (HF's output_attentions returns only text→vision)."""
    from xattn_cli.capture import AttentionRecorder

    adapter = _adapter("lxmert", tokenizer)
    batch = adapter.tokenize(QUESTIONS[1:])  # different lengths: the second is padded
    assert not batch["attention_mask"].bool().all()
    regions = _regions(_images()[:2])
    with torch.no_grad():
        hf = adapter.model(**batch, visual_feats=regions.features, visual_pos=regions.boxes,
                           visual_attention_mask=regions.mask, output_attentions=True)
    with torch.no_grad(), AttentionRecorder(adapter.attention_sites()) as recording:
        adapter.answer_logits(batch, regions)
    text_to_vision = recording.select("cross", "text->vision")
    vision_to_text = recording.select("cross", "vision->text")
    assert len(text_to_vision) == len(vision_to_text) == len(hf.cross_encoder_attentions) == 3
    for event, expected in zip(text_to_vision, hf.cross_encoder_attentions):
        torch.testing.assert_close(event.probs, expected)
    for event in vision_to_text:
        assert event.probs.shape == (2, 2, 9, batch["input_ids"].shape[1])
        padded = ~batch["attention_mask"].bool()  # vision queries give padded text keys no attention
        assert event.probs.masked_select(padded[:, None, None, :].expand_as(event.probs)).abs().max() == 0


# ------------------------------------------------------------------------------------------------
# DETR
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("residual", ["guarded", "official"])
@pytest.mark.parametrize("count", [1, 3])
def test_detr_relevance_equals_literal_reference(count, residual):
    from xattn_cli.capture import AttentionRecorder
    from xattn_cli.capture.gradients import input_gradients_only
    from xattn_cli.methods.coattention import encoder_decoder_relevance
    from xattn_cli.models.detr import DetrAdapter

    images = _images()[:count]
    adapter = DetrAdapter(_detr_model().double(), size=DETR_SIZE)
    queries = [1, 4, 2][:count]  # a different query per image
    pixels = _detr_pixels(images).double()
    with input_gradients_only(adapter.model), AttentionRecorder(adapter.attention_sites()) as recording:
        logits, _ = adapter.detect(pixels.requires_grad_(True))
        labels = [int(logits[i, q, :-1].argmax()) for i, q in enumerate(queries)]
        sum(logits[i, q, c] for i, (q, c) in enumerate(zip(queries, labels))).backward()
    relevance = encoder_decoder_relevance(recording.select("self", "encoder"), recording.select("self", "decoder"),
                                          recording.select("cross", "decoder->encoder"), residual=residual)
    assert relevance.shape == (count, 6, 30)
    guarded = []
    for i, (image, query) in enumerate(zip(images, queries)):
        expected, label, had_nan = _detr_reference(adapter.model, image, query, residual)
        guarded.append(had_nan)
        assert labels[i] == label
        if residual == "guarded" or not had_nan:  # official + NaN: every rule-10 addition may be dropped (all 0)
            assert float(expected.max()) > 1e-4, "degenerate test model"
        torch.testing.assert_close(relevance[i, query], expected, **TIGHT)
    if count == 3:  # some query has an all-zero decoder self-attention row: the guarded path is exercised
        assert any(guarded) and not all(guarded)


def test_detr_explainer_one_target_per_detection():
    """A float64 model (the backbone makes float32 gradients too coarse for 1e-5 on the maps)."""
    from xattn_cli.explainers.detection import DetectionRelevancy
    from xattn_cli.models.detr import DetrAdapter, feature_grid

    model = _detr_model()
    images = _images()
    threshold = 0.25  # image 0: no detection; images 1 and 2: several
    adapter = DetrAdapter(copy.deepcopy(model).double(), size=DETR_SIZE)
    results = DetectionRelevancy(adapter, threshold=threshold).explain(images)
    assert feature_grid(DETR_SIZE, 30) == (5, 6)
    for image, targets in zip(images, results):
        with torch.no_grad():
            output = copy.deepcopy(model).double()(pixel_values=_detr_pixels([image]).double())
        probabilities = output.logits[0].softmax(-1)[:, :-1]
        best = probabilities.max(-1).values
        kept = [q for q in best.argsort(descending=True).tolist() if best[q] > threshold]
        assert [t.extra["query"] for t in targets] == kept
        for rank, (query, target) in enumerate(zip(kept, targets)):
            expected, label, _ = _detr_reference(model, image, query)
            name = ["circle", "square", "star", "ring"][label]
            assert target.target == f"{name}-{rank}" and target.extra["label"] == name
            assert target.score == pytest.approx(float(best[query]), abs=1e-5)
            cx, cy, w, h = output.pred_boxes[0, query].tolist()
            box = [(cx - w / 2) * image.width, (cy - h / 2) * image.height, (cx + w / 2) * image.width,
                   (cy + h / 2) * image.height]
            assert target.extra["box"] == pytest.approx(box, abs=0.06)
            np.testing.assert_allclose(target.map, _map_literal(expected, (5, 6), (image.height, image.width)),
                                       atol=ATOL_MAP, rtol=0)
            assert target.to_json()["peak"] == target.peak
    assert [len(targets) for targets in results] == [0, 4, 3]


@pytest.mark.parametrize("method", ["raw", "attn-gradcam"])
def test_detr_baselines_equal_literal_reference(method):
    from xattn_cli.explainers.detection import DetectionRelevancy
    from xattn_cli.models.detr import DetrAdapter

    model = _detr_model()
    images = _images()[1:]
    adapter = DetrAdapter(copy.deepcopy(model).double(), size=DETR_SIZE)
    results = DetectionRelevancy(adapter, threshold=0.25, method=method).explain(images)
    assert all(results)
    for image, targets in zip(images, results):
        for target in targets:
            query = target.extra["query"]
            _, _, decoder_cross, _ = _detr_captured(model, image, query)
            expected = _last_layer_literal(method, *decoder_cross[-1])[query]
            np.testing.assert_allclose(target.map, _map_literal(expected, (5, 6), (image.height, image.width)),
                                       atol=ATOL_MAP, rtol=0)


# ------------------------------------------------------------------------------------------------
# batches equal single runs (explainer level, float32)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["lxmert", "visualbert", "detr"])
def test_batch_of_three_equals_three_single_runs(tokenizer, family):
    from xattn_cli.explainers.detection import DetectionRelevancy
    from xattn_cli.explainers.vqa import VqaRelevancy

    adapter = _adapter(family, tokenizer)
    explainer = (DetectionRelevancy(adapter, threshold=0.25) if family == "detr"
                 else VqaRelevancy(adapter, QUESTIONS))  # three questions of different lengths
    assert_batch_equals_single_runs(explainer, _images())


# ------------------------------------------------------------------------------------------------
# CrossAttention: masks, and a two-stream model made of it explained by the co-attention rules
# ------------------------------------------------------------------------------------------------


def test_cross_attention_masks():
    from xattn_cli.nn import CrossAttention

    torch.manual_seed(0)
    attention = CrossAttention(query_dim=12, context_dim=20, dim=16, heads=4).eval()
    queries, context = torch.randn(2, 5, 12), torch.randn(2, 7, 20)
    context_mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    query_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    output, probs = attention(queries, context, context_mask, query_mask)
    assert output.shape == (2, 5, 16) and probs.shape == (2, 4, 5, 7)
    assert torch.all(probs[0, :, :, 5:] == 0), "padded keys get probability 0"
    torch.testing.assert_close(probs[0].sum(-1), torch.ones(4, 5))
    assert torch.all(probs[1, :, 3:] == 0) and torch.all(output[1, 3:] == 0), "padded queries: zero row and output"
    changed = context.clone()
    changed[0, 5:] = 100 * torch.randn(2, 20)
    output_changed, _ = attention(queries, changed, context_mask, query_mask)
    torch.testing.assert_close(output_changed, output, rtol=0, atol=0)
    # and against the textbook formula on the real tokens of sample 0
    q = attention.query(queries[0]).view(5, 4, 4).transpose(0, 1)
    k = attention.key(context[0, :5]).view(5, 4, 4).transpose(0, 1)
    v = attention.value(context[0, :5]).view(5, 4, 4).transpose(0, 1)
    expected_probs = torch.softmax(q @ k.transpose(1, 2) / 2.0, dim=-1)
    torch.testing.assert_close(probs[0, :, :, :5], expected_probs)
    expected = attention.out((expected_probs @ v).transpose(0, 1).reshape(5, 16))
    torch.testing.assert_close(output[0], expected)
    # gradients stay finite with a sample whose keys are all padding
    queries.requires_grad_(True)
    _, probs = attention(queries, context, torch.zeros(2, 7), query_mask)
    assert torch.all(probs == 0)
    attention(queries, context, context_mask, query_mask)[0].sum().backward()
    assert torch.isfinite(queries.grad).all()


class _CoAttentionVqa(torch.nn.Module):
    """A tiny two-stream VQA model laid out like LXMERT, every attention a `CrossAttention`.
    `forward` also returns each attention's probabilities, keyed by role, for the independent reference."""

    def __init__(self, vocab: int, features: int, dim: int = 16, heads: int = 2, answers: int = 5):
        super().__init__()
        from xattn_cli.nn import CrossAttention

        def attention():
            return CrossAttention(dim, dim, dim, heads)

        self.embed, self.visual = torch.nn.Embedding(vocab, dim), torch.nn.Linear(features, dim)
        self.language = torch.nn.ModuleList([attention() for _ in range(2)])
        self.relation = torch.nn.ModuleList([attention()])
        self.cross = torch.nn.ModuleList([torch.nn.ModuleDict({role: attention() for role in ("t2v", "v2t", "lang", "visn")})
                                          for _ in range(2)])
        self.norm = torch.nn.LayerNorm(dim)
        self.head = torch.nn.Linear(dim, answers)

    def forward(self, ids, text_mask, features, region_mask):
        kept = {}
        text, image = self.embed(ids), self.visual(features)
        for i, block in enumerate(self.language):
            out, kept[("lang", i)] = block(text, text, text_mask, text_mask)
            text = self.norm(text + out)
        for i, block in enumerate(self.relation):
            out, kept[("rel", i)] = block(image, image, region_mask, region_mask)
            image = self.norm(image + out)
        for i, layer in enumerate(self.cross):
            to_image, kept[("t2v", i)] = layer["t2v"](text, image, region_mask, text_mask)
            to_text, kept[("v2t", i)] = layer["v2t"](image, text, text_mask, region_mask)
            text, image = self.norm(text + to_image), self.norm(image + to_text)
            out, kept[("x-lang", i)] = layer["lang"](text, text, text_mask, text_mask)
            text = self.norm(text + out)
            out, kept[("x-visn", i)] = layer["visn"](image, image, region_mask, region_mask)
            image = self.norm(image + out)
        return self.head(torch.tanh(text[:, 0])), kept

    def sites(self):
        from xattn_cli.capture import AttentionSite

        def site(module, kind, stream, layer):
            return AttentionSite(module, kind, stream, layer, "dropout", "attn_drop")

        sites = [site(m, "self", "text", i) for i, m in enumerate(self.language)]
        sites += [site(m, "self", "vision", i) for i, m in enumerate(self.relation)]
        for i, layer in enumerate(self.cross):
            sites += [site(layer["t2v"], "cross", "text->vision", i), site(layer["v2t"], "cross", "vision->text", i),
                      site(layer["lang"], "self", "text", len(self.language) + i),
                      site(layer["visn"], "self", "vision", len(self.relation) + i)]
        return sites


@pytest.mark.parametrize("count", [1, 3])
def test_cross_attention_model_explained_by_coattention_rules(tokenizer, count):
    from xattn_cli.capture import AttentionRecorder
    from xattn_cli.methods.coattention import bimodal_relevance

    torch.manual_seed(7)
    model = _perturb(_CoAttentionVqa(len(WORDS), 3 * CELL * CELL), 70, scale=0.3).double()
    images, questions = _images()[:count], QUESTIONS[:count]
    tokens = tokenizer(questions, padding=True, return_tensors="pt")
    regions = _regions(images)
    features = regions.features.double().requires_grad_(True)
    with AttentionRecorder(model.sites()) as recording:
        logits, _ = model(tokens["input_ids"], tokens["attention_mask"], features, regions.mask)
        answers = logits.detach().argmax(-1)
        logits.gather(1, answers[:, None]).sum().backward()
    r_tt, r_ti = bimodal_relevance(recording.select("self", "text"), recording.select("self", "vision"),
                                   recording.select("cross", "text->vision"), recording.select("cross", "vision->text"))
    for i, (question, image) in enumerate(zip(questions, images)):
        single = tokenizer([question], return_tensors="pt")
        single_regions = _regions([image])
        logits, kept = model(single["input_ids"], single["attention_mask"], single_regions.features.double(),
                             single_regions.mask)
        assert int(logits[0].argmax()) == int(answers[i])
        grads = dict(zip(kept, torch.autograd.grad(logits[0, answers[i]], list(kept.values()), allow_unused=True)))
        pair = {key: (kept[key][0].detach(), None if grads[key] is None else grads[key][0]) for key in kept}
        cross = [{"t2v": pair[("t2v", j)], "v2t": pair[("v2t", j)], "lang": pair[("x-lang", j)],
                  "visn": pair[("x-visn", j)]} for j in range(2)]
        ref_tt, ref_ti = _bimodal_literal([pair[("lang", j)] for j in range(2)], [pair[("rel", 0)]], cross,
                                          single["input_ids"].shape[1], 9)
        length = single["input_ids"].shape[1]
        assert float(ref_ti[0].max()) > 1e-3
        torch.testing.assert_close(r_tt[i, 0, :length], ref_tt[0], **TIGHT)
        torch.testing.assert_close(r_ti[i, 0], ref_ti[0], **TIGHT)


# ------------------------------------------------------------------------------------------------
# the guarded residual normalisation (a documented deviation) and region painting
# ------------------------------------------------------------------------------------------------


def test_rule_10_keeps_defined_rows_where_the_official_code_gives_nan():
    """Query rows never updated: the official R̄ is NaN there, NaN spreads through R̄ᵀ to the whole rule-10
    addition and DETR's NaN → 0 then drops it all. The package (a documented deviation, as the reference
    recommends) leaves those rows of R̄ at the identity and keeps the addition."""
    from xattn_cli.methods.coattention import cross_attention_additions

    g = torch.Generator().manual_seed(3)
    r_qq = torch.eye(3, dtype=torch.float64)
    r_qq[0] += torch.rand(3, generator=g, dtype=torch.float64)  # row 0 updated, rows 1 and 2 never
    r_ii = torch.eye(4, dtype=torch.float64) + torch.rand(4, 4, generator=g, dtype=torch.float64)
    cam = torch.rand(3, 4, generator=g, dtype=torch.float64)
    official = _handle_residual_official(r_qq).t() @ cam @ _handle_residual_official(r_ii)
    assert torch.isnan(official).all()  # NaN everywhere: the official DETR code would add nothing
    add, none = cross_attention_additions(cam[None], r_qq[None], r_ii[None], None)
    assert none is None and torch.isfinite(add).all()
    residual = r_qq[0] - torch.eye(3, dtype=torch.float64)[0]
    normalised = torch.eye(3, dtype=torch.float64)
    normalised[0] = residual / residual.sum() + torch.eye(3, dtype=torch.float64)[0]
    torch.testing.assert_close(add[0], normalised.t() @ cam @ _handle_residual_official(r_ii))
    official_add, _ = cross_attention_additions(cam[None], r_qq[None], r_ii[None], None, residual="official")
    torch.testing.assert_close(official_add[0], torch.zeros_like(official))  # the official rule: nothing added


def test_official_residual_rule_divides_like_the_official_code():
    from xattn_cli.methods.relevancy import handle_residual

    g = torch.Generator().manual_seed(4)
    r = torch.eye(4, dtype=torch.float64) + torch.rand(4, 4, generator=g, dtype=torch.float64)
    r[2] = torch.eye(4, dtype=torch.float64)[2]  # a row never updated: 0/0
    official = handle_residual(r[None], residual="official")[0]
    expected = _handle_residual_official(r)
    assert torch.isnan(official[2]).all() and torch.isnan(expected[2]).all()
    torch.testing.assert_close(official[[0, 1, 3]], expected[[0, 1, 3]], **TIGHT)
    torch.testing.assert_close(handle_residual(r[None])[0], _handle_residual_guarded(r), **TIGHT)
    with pytest.raises(ValueError, match="residual"):
        handle_residual(r[None], residual="nan")


def test_npz_regions_and_box_painting(tmp_path):
    from xattn_cli.models.regions import NpzRegions
    from xattn_cli.tensors import paint_boxes

    boxes = np.array([[[0, 0, 20, 10], [10, 5, 40, 30], [0, 0, 0, 0]]], dtype=np.float32)
    np.savez(tmp_path / "f.npz", names=np.array(["cat"]), features=np.ones((1, 3, 8), np.float32), boxes=boxes,
             counts=np.array([2]))
    image = Image.new("RGB", (40, 30))
    regions = NpzRegions(tmp_path / "f.npz")([image], ["some/dir/cat.png"])
    assert regions.features.shape == (1, 3, 8) and regions.mask.tolist() == [[1, 1, 0]]
    torch.testing.assert_close(regions.boxes[0, 1], torch.tensor([0.25, 1 / 6, 1.0, 1.0]))
    real = regions.mask[0] > 0
    painted = paint_boxes(torch.tensor([0.2, 0.7, 5.0])[real], regions.boxes[0][real], (30, 40))
    assert painted.shape == (30, 40)
    assert painted[2, 2] == pytest.approx(0.2) and painted[20, 30] == pytest.approx(0.7)
    assert painted[8, 15] == pytest.approx(0.7)  # overlap: the larger
    assert painted[25, 5] == 0 and painted.max() == pytest.approx(0.7)  # padded region ignored
