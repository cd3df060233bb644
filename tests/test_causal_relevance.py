"""Relevancy through causal attention (`methods/causal.py`) on a tiny in-memory CATT VQA model.

The model is laid out as shapes-catt (shared/reference/catt.md §3): question self-attention layers, a vision
block of `CausalAttention`s with region queries (IS over the image's regions, CS over a dictionary), then
question→image fusion `CrossAttention`s and a [CLS] head; random float64 weights, fixed seeds, never
registered. The package runs a padded batch through the recorder; the reference runs each sample alone,
unpadded, takes the probabilities the modules themselves return, their gradients by autograd.grad, and
applies a literal transcription of the general three-stream rule of catt.md §3 (every R^sx kept, none
assumed zero) with its own rule 5 and guarded eqs. 8+9 (reference/chefer-relevancy.md §1.2-1.5).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from xattn_cli.capture import AttentionRecorder, AttentionSite
from xattn_cli.methods.causal import causal_last_layer, causal_relevance
from xattn_cli.nn import CausalAttention, CrossAttention

DIM, HEADS, ENTRIES, VOCAB, FEATURES, ANSWERS = 12, 4, 5, 20, 6, 4
TEXT_MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])  # padded questions
REGION_MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]])  # padded regions
TIGHT = {"rtol": 1e-7, "atol": 1e-12}  # float64 package (padded batch) vs float64 reference (single runs)
STREAMS = ("t", "i", "d")


# ------------------------------------------------------------------------------------------------
# the tiny model: CATT, and the same weights with the IS branch only
# ------------------------------------------------------------------------------------------------


class _InSampleOnly(nn.Module):
    """A causal block without CS-ATT: its IS branch and the IS half of its `combine`."""

    def __init__(self, block: CausalAttention):
        super().__init__()
        self.in_sample = copy.deepcopy(block.in_sample)
        self.project = nn.Linear(DIM, DIM).double()
        with torch.no_grad():
            self.project.weight.copy_(block.combine.weight[:, :DIM])
            self.project.bias.copy_(block.combine.bias)

    def forward(self, queries, context, context_mask, query_mask):
        out, probs = self.in_sample(queries, context, context_mask, query_mask)
        out = self.project(out).masked_fill(~query_mask.bool()[..., None], 0.0)
        return out, probs, None


class _CattVqa(nn.Module):
    """Question self-attention ×2 → vision block of CausalAttention ×2 (region queries) → fusion ×2 → [CLS].
    `forward` also returns each attention's probabilities, keyed by role, for the reference."""

    def __init__(self):
        super().__init__()
        self.embed, self.position = nn.Embedding(VOCAB, DIM), nn.Embedding(8, DIM)
        self.visual = nn.Linear(FEATURES, DIM)
        self.question = nn.ModuleList([CrossAttention(DIM, DIM, DIM, HEADS) for _ in range(2)])
        self.vision = nn.ModuleList([CausalAttention(DIM, DIM, DIM, HEADS, ENTRIES) for _ in range(2)])
        self.fusion = nn.ModuleList([CrossAttention(DIM, DIM, DIM, HEADS) for _ in range(2)])
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, ANSWERS)

    def forward(self, ids, text_mask, features, region_mask):
        kept = {}
        text = self.embed(ids) + self.position(torch.arange(ids.shape[1]))
        for j, block in enumerate(self.question):
            out, kept["text", j] = block(text, text, text_mask, text_mask)
            text = self.norm(text + out)
        image = self.visual(features)
        for j, block in enumerate(self.vision):
            out, kept["is", j], kept["cs", j] = block(image, image, region_mask, region_mask)
            image = self.norm(image + out)
        for j, block in enumerate(self.fusion):
            out, kept["fusion", j] = block(text, image, region_mask, text_mask)
            text = self.norm(text + out)
        return self.head(torch.tanh(text[:, 0])), {key: probs for key, probs in kept.items() if probs is not None}

    def sites(self) -> list[AttentionSite]:
        def site(module, kind, stream, layer):
            return AttentionSite(module, kind, stream, layer, "dropout", "attn_drop")

        sites = [site(block, "self", "text", j) for j, block in enumerate(self.question)]
        for j, block in enumerate(self.vision):
            sites.append(site(block.in_sample, "self", "vision", j))
            if isinstance(block, CausalAttention):
                sites.append(site(block.cross_sample, "cross", "vision->dictionary", j))
        return sites + [site(block, "cross", "text->vision", j) for j, block in enumerate(self.fusion)]


def _catt(seed: int = 0) -> _CattVqa:
    torch.manual_seed(seed)
    model = _CattVqa().double().eval()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for parameter in model.parameters():  # peaked attention, large gradients: the rules have work to do
            parameter.add_(torch.randn(parameter.shape, generator=g, dtype=torch.float64) * 0.6)
        for block in model.vision:
            block.load_dictionary(torch.randn(ENTRIES, DIM, generator=g, dtype=torch.float64))
    return model


def _cs_zeroed(model: _CattVqa) -> _CattVqa:
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for block in zeroed.vision:
            block.combine.weight[:, DIM:] = 0
    return zeroed


def _in_sample_only(model: _CattVqa) -> _CattVqa:
    only = copy.deepcopy(model)
    only.vision = nn.ModuleList([_InSampleOnly(block) for block in model.vision])
    return only


MODELS = {"catt": _catt, "cs zeroed": lambda: _cs_zeroed(_catt()), "is only": lambda: _in_sample_only(_catt())}


def _inputs():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, VOCAB, TEXT_MASK.shape, generator=g) * TEXT_MASK  # (B, T), padding id 0
    features = torch.randn(*REGION_MASK.shape, FEATURES, generator=g, dtype=torch.float64) * REGION_MASK[..., None]
    return ids, features


def _recorded(model: _CattVqa):
    """The padded batch through the recorder; each sample's predicted answer as the target."""
    ids, features = _inputs()
    with AttentionRecorder(model.sites()) as recording:
        logits, _ = model(ids, TEXT_MASK, features, REGION_MASK)
        answers = logits.detach().argmax(-1)
        logits.gather(1, answers[:, None]).sum().backward()
    return recording, answers


def _streams(recording):
    return (recording.select("self", "text"), recording.select("self", "vision"),
            recording.select("cross", "text->vision"), recording.select("cross", "vision->dictionary"))


def _single(model: _CattVqa, b: int, answer: int) -> dict:
    """Sample b alone, unpadded: {role: (A (H, N, M), ∇A)} from the module outputs and autograd.grad."""
    ids, features = _inputs()
    words, regions = int(TEXT_MASK[b].sum()), int(REGION_MASK[b].sum())
    logits, kept = model(ids[b:b + 1, :words], torch.ones(1, words), features[b:b + 1, :regions], torch.ones(1, regions))
    assert int(logits[0].argmax()) == answer
    grads = torch.autograd.grad(logits[0, answer], list(kept.values()))
    return {key: (probs[0].detach(), grad[0]) for (key, probs), grad in zip(kept.items(), grads)}


# ------------------------------------------------------------------------------------------------
# the literal rules, one sample
# ------------------------------------------------------------------------------------------------


def _avg_heads(cam: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Rule 5: (1/H) Σ_h max(0, ∇A_h ⊙ A_h). (H, N, M) → (N, M)."""
    total = torch.zeros(cam.shape[1:], dtype=torch.float64)
    for h in range(cam.shape[0]):
        total += torch.clamp(grad[h] * cam[h], min=0)
    return total / cam.shape[0]


def _normalised(r: torch.Tensor) -> torch.Tensor:
    """Eqs. 8+9 with the reference's guard: R̄ = rownorm(R − I) + I, a zero-sum row of R − I left at zero."""
    eye = torch.eye(r.shape[0], dtype=torch.float64)
    hat = r.clone() - eye
    for row in range(hat.shape[0]):
        if hat[row].sum() != 0:
            hat[row] = hat[row] / hat[row].sum()
    return hat + eye


def _literal_relevance(pairs: dict, sizes: dict[str, int]):
    """catt.md §3's general rule over streams t, i, d, every R^sx kept: stream s attending q with Ā adds
    R̄^ssᵀ Ā R̄^qq to R^sq and Ā R^qx to R^sx for every other x; s = q adds Ā R^sx to every R^sx. A causal
    block's IS and CS additions are both taken from the old matrices. Read at [CLS]."""
    relevance = {(s, x): torch.eye(sizes[s], dtype=torch.float64) if s == x
                 else torch.zeros(sizes[s], sizes[x], dtype=torch.float64) for s in STREAMS for x in STREAMS}

    def attend(s: str, q: str, probs, grad) -> dict:
        a = _avg_heads(probs, grad)
        if s == q:
            return {(s, x): a @ relevance[s, x] for x in STREAMS}
        additions = {(s, q): _normalised(relevance[s, s]).t() @ a @ _normalised(relevance[q, q])}
        additions.update({(s, x): a @ relevance[q, x] for x in STREAMS if x != q})
        return additions

    def add(*all_additions: dict) -> None:
        for additions in all_additions:
            for key, value in additions.items():
                relevance[key] = relevance[key] + value

    for j in range(2):
        add(attend("t", "t", *pairs["text", j]))
    for j in range(2):
        add(attend("i", "i", *pairs["is", j]), *([attend("i", "d", *pairs["cs", j])] if ("cs", j) in pairs else []))
    for j in range(2):
        add(attend("t", "i", *pairs["fusion", j]))
    tokens = relevance["t", "t"][0].clone()
    tokens[0] = 0
    return tokens, relevance["t", "i"][0], relevance["t", "d"][0]


def _last_layer_literal(method: str, probs: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Reference §3 on one sample's (H, N, M): raw = heads averaged; attn-gradcam = each head times the mean
    of its gradient, averaged, positive part."""
    if method == "raw":
        return probs.mean(dim=0)
    return (probs * grad.mean(dim=(1, 2), keepdim=True)).mean(dim=0).clamp(min=0)


# ------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(MODELS))
def test_causal_relevance_equals_a_literal_per_sample_transcription(variant):
    model = MODELS[variant]()
    recording, answers = _recorded(model)
    got = causal_relevance(*_streams(recording))
    entries = 0 if variant == "is only" else ENTRIES
    assert got.tokens.shape == TEXT_MASK.shape and got.regions.shape == REGION_MASK.shape
    assert got.entries.shape == (len(TEXT_MASK), entries)
    for b, answer in enumerate(answers.tolist()):
        words, regions = int(TEXT_MASK[b].sum()), int(REGION_MASK[b].sum())
        tokens, to_regions, to_entries = _literal_relevance(_single(model, b, answer),
                                                            {"t": words, "i": regions, "d": entries})
        assert float(to_regions.max()) > 1e-2 and float(tokens.max()) > 1e-3  # not a trivial case
        if variant == "catt":
            assert float(to_entries.max()) > 1e-4
        torch.testing.assert_close(got.tokens[b, :words], tokens, **TIGHT)
        torch.testing.assert_close(got.regions[b, :regions], to_regions, **TIGHT)
        torch.testing.assert_close(got.entries[b], to_entries, **TIGHT)
        assert not got.tokens[b, words:].any() and not got.regions[b, regions:].any()  # padding stays inert
        share = float(to_entries.sum() / (to_regions.sum() + to_entries.sum()))
        assert float(got.dictionary_share[b]) == pytest.approx(share, abs=1e-9)


def test_with_the_cs_half_of_the_fusion_zeroed_the_dictionary_gets_nothing_and_regions_are_the_is_only_models():
    full, zeroed, only = (causal_relevance(*_streams(_recorded(MODELS[name]())[0])) for name in MODELS)
    assert float(full.entries.min()) >= 0 and float(full.entries.max()) > 1e-2  # the entries matter with CS on
    assert torch.equal(zeroed.entries, torch.zeros_like(zeroed.entries))
    assert torch.equal(zeroed.dictionary_share, torch.zeros(len(TEXT_MASK), dtype=torch.float64))
    torch.testing.assert_close(zeroed.regions, only.regions, atol=1e-12, rtol=0)
    torch.testing.assert_close(zeroed.tokens, only.tokens, atol=1e-12, rtol=0)
    assert not torch.allclose(zeroed.regions, full.regions, atol=1e-3)  # CS changes the regions' gradients too


@pytest.mark.parametrize("variant", ["catt", "is only"])
@pytest.mark.parametrize("method", ["raw", "attn-gradcam"])
def test_last_layer_baselines_equal_direct_formulas(method, variant):
    model = MODELS[variant]()
    recording, answers = _recorded(model)
    got = causal_last_layer(method, *_streams(recording), TEXT_MASK, REGION_MASK)
    for b, answer in enumerate(answers.tolist()):
        pairs = _single(model, b, answer)
        words, regions = int(TEXT_MASK[b].sum()), int(REGION_MASK[b].sum())
        tokens = _last_layer_literal(method, *pairs["text", 1])[0].clone()
        tokens[0] = 0
        cls_row = _last_layer_literal(method, *pairs["fusion", 1])[0]  # (I,)
        to_regions = cls_row @ _last_layer_literal(method, *pairs["is", 1])
        assert float(to_regions.max()) > 0 and float(tokens.max()) > 0  # small under attn-gradcam: rtol compares
        torch.testing.assert_close(got.tokens[b, :words], tokens, **TIGHT)
        torch.testing.assert_close(got.regions[b, :regions], to_regions, **TIGHT)
        if variant == "catt":
            to_entries = cls_row @ _last_layer_literal(method, *pairs["cs", 1])
            assert float(to_entries.max()) > 0
            torch.testing.assert_close(got.entries[b], to_entries, **TIGHT)
        else:
            assert got.entries.shape == (len(TEXT_MASK), 0)
    if method == "raw" and variant == "catt":  # every attention row sums to 1: regions and entries weigh alike
        torch.testing.assert_close(got.dictionary_share, torch.full((len(TEXT_MASK),), 0.5, dtype=torch.float64))


def test_inconsistent_recordings_are_refused():
    recording, _ = _recorded(_catt())
    text_self, vision_self, text_to_vision, dictionary = _streams(recording)
    with pytest.raises(ValueError, match="no question→image attention"):
        causal_relevance(text_self, vision_self, [], dictionary)
    with pytest.raises(ValueError, match=r"vision layers \[1\] has no in-sample"):
        causal_relevance(text_self, vision_self[:1], text_to_vision, dictionary)
    with pytest.raises(ValueError, match="not the last vision layer"):
        causal_last_layer("raw", text_self, vision_self, text_to_vision, dictionary[:1], TEXT_MASK, REGION_MASK)
    with pytest.raises(ValueError, match="not a last-layer baseline"):
        causal_last_layer("chefer", text_self, vision_self, text_to_vision, dictionary, TEXT_MASK, REGION_MASK)
