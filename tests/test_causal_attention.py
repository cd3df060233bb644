"""`CausalAttention` (CATT): the seed's two attentions + concat + linear, written out per sample and per head;
the dictionary frozen or learnt; the recorder sees the CS probabilities that multiply the dictionary values."""
from __future__ import annotations

import math

import pytest
import torch

from xattn_cli.capture import AttentionRecorder, AttentionSite
from xattn_cli.errors import UsageError
from xattn_cli.nn import CausalAttention

HEADS, DIM, K = 3, 12, 7
QUERY_MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])  # sample 1: two padded question tokens
CONTEXT_MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])  # sample 1: two padded regions


def _module(dtype: torch.dtype, learn: bool = False) -> CausalAttention:
    torch.manual_seed(0)
    module = CausalAttention(query_dim=10, context_dim=8, dim=DIM, heads=HEADS, dictionary_size=K,
                             dictionary_dim=9, learn_dictionary=learn).to(dtype).eval()
    module.load_dictionary(torch.randn(K, 9, dtype=dtype))
    return module


def _inputs(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 5, 10, generator=g, dtype=dtype), torch.randn(2, 6, 8, generator=g, dtype=dtype)


def _linear(layer: torch.nn.Linear, x: list[float]) -> list[float]:
    return [sum(w * v for w, v in zip(row, x)) + b for row, b in zip(layer.weight.tolist(), layer.bias.tolist())]


def _attention_literal(branch, query: list[float], keys: list[list[float]]) -> tuple[list[float], list[list[float]]]:
    """One query over real keys: per head softmax(q·k / √d) by explicit exponentials, Σ p v, out projection.
    Returns the output and the per-head probabilities."""
    d = DIM // HEADS
    q = _linear(branch.query, query)
    ks = [_linear(branch.key, key) for key in keys]
    vs = [_linear(branch.value, key) for key in keys]
    merged, probs = [], []
    for h in range(HEADS):
        part = slice(h * d, (h + 1) * d)
        scores = [sum(a * b for a, b in zip(q[part], k[part])) / math.sqrt(d) for k in ks]
        top = max(scores)
        weights = [math.exp(s - top) for s in scores]
        p = [w / sum(weights) for w in weights]
        probs.append(p)
        merged += [sum(p[j] * vs[j][part][c] for j in range(len(vs))) for c in range(d)]
    return _linear(branch.out, merged), probs


def _causal_literal(module: CausalAttention, queries, context, query_mask, context_mask):
    """The seed's Ẑ = V_I softmax(Q_Iᵀ K_I) over real regions, X̂ = V_C softmax(Q_Cᵀ K_C) over the K entries,
    out = W [Ẑ ; X̂] + b; padded queries: zero output and zero probabilities."""
    batch, nq, nk = queries.shape[0], queries.shape[1], context.shape[1]
    out = torch.zeros(batch, nq, DIM, dtype=torch.float64)
    p_in = torch.zeros(batch, HEADS, nq, nk, dtype=torch.float64)
    p_cross = torch.zeros(batch, HEADS, nq, K, dtype=torch.float64)
    entries = module.dictionary.detach().tolist()
    for b in range(batch):
        real_keys = [context[b, j].tolist() for j in range(nk) if context_mask[b, j]]
        for i in range(nq):
            if not query_mask[b, i]:
                continue
            z, probs_in = _attention_literal(module.in_sample, queries[b, i].tolist(), real_keys)
            x, probs_cross = _attention_literal(module.cross_sample, queries[b, i].tolist(), entries)
            out[b, i] = torch.tensor(_linear(module.combine, z + x), dtype=torch.float64)
            p_in[b, :, i, :len(real_keys)] = torch.tensor(probs_in, dtype=torch.float64)
            p_cross[b, :, i] = torch.tensor(probs_cross, dtype=torch.float64)
    return out, p_in, p_cross


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_equals_a_literal_transcription_of_the_seed_equations(dtype, tolerance):
    module = _module(dtype)
    queries, context = _inputs(dtype)
    with torch.no_grad():
        out, p_in, p_cross = module(queries, context, CONTEXT_MASK, QUERY_MASK)
    expected = _causal_literal(module, queries.double(), context.double(), QUERY_MASK, CONTEXT_MASK)
    assert float(expected[0].abs().max()) > 0.1 and float(expected[2].std()) > 1e-3  # not a trivial case
    for got, want in zip((out, p_in, p_cross), expected):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, atol=tolerance, rtol=0)


def test_self_attention_use_and_unmasked_defaults():
    module = _module(torch.float64)
    queries, _ = _inputs(torch.float64)
    everything = torch.ones(2, 5, dtype=torch.long)
    with torch.no_grad():
        out, p_in, p_cross = CausalAttention(10, 10, DIM, HEADS, K, 9).double()(queries, queries)
        assert out.shape == (2, 5, DIM) and p_in.shape == (2, HEADS, 5, 5) and p_cross.shape == (2, HEADS, 5, K)
        unmasked = module(queries, _inputs(torch.float64)[1])
        masked = module(queries, _inputs(torch.float64)[1], torch.ones(2, 6), everything)
    for a, b in zip(unmasked, masked):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("learn", [False, True])
def test_a_frozen_dictionary_gets_no_gradient_and_a_learnt_one_does(learn):
    module = _module(torch.float64, learn=learn).train()
    queries, context = _inputs(torch.float64)
    before = module.dictionary.detach().clone()
    optimiser = torch.optim.SGD(module.parameters(), lr=0.1)
    module(queries, context, CONTEXT_MASK, QUERY_MASK)[0].square().sum().backward()
    optimiser.step()
    names = {name for name, _ in module.named_parameters()}
    if learn:
        assert "dictionary" in names and module.dictionary.grad is not None
        assert float(module.dictionary.grad.abs().max()) > 0
        assert not torch.equal(module.dictionary.detach(), before)
    else:
        assert "dictionary" not in names and "dictionary" in module.state_dict()
        assert not module.dictionary.requires_grad and module.dictionary.grad is None
        assert torch.equal(module.dictionary, before)


def test_official_initialisation_and_dictionary_shape_check():
    module = CausalAttention(8, 8, 8, dictionary_size=50, learn_dictionary=True)
    entries = module.dictionary.detach()
    assert entries.shape == (50, 8) and float(entries.min()) >= 0 and float(entries.max()) < 0.01
    with pytest.raises(UsageError, match=r"\(50, 4\).*\(50, 8\)"):
        module.load_dictionary(torch.zeros(50, 4))


def test_recorder_sees_the_cs_probabilities_that_multiply_the_dictionary_values():
    module = _module(torch.float64)
    queries, context = _inputs(torch.float64)
    queries.requires_grad_(True)
    sites = [AttentionSite(module.in_sample, "cross", "text->vision", 0, "dropout", "attn_drop"),
             AttentionSite(module.cross_sample, "cross", "text->dictionary", 0, "dropout", "attn_drop")]
    with AttentionRecorder(sites) as recording:
        out, p_in, p_cross = module(queries, context, CONTEXT_MASK, QUERY_MASK)
        out.sum().backward()
    [vision] = recording.select("cross", "text->vision")
    [dictionary] = recording.select("cross", "text->dictionary")
    torch.testing.assert_close(vision.probs, p_in.detach(), atol=0, rtol=0)
    torch.testing.assert_close(dictionary.probs, p_cross.detach(), atol=0, rtol=0)
    assert vision.grad is not None and dictionary.grad is not None and float(dictionary.grad.abs().max()) > 0
    # rows sum to 1 over the K entries for real question tokens, 0 for padded ones
    torch.testing.assert_close(dictionary.probs.sum(-1), QUERY_MASK[:, None, :].double().expand(2, HEADS, 5))
    # the output recomputed from the recorded tensors: CS probabilities times the dictionary values
    branch = module.cross_sample
    values = branch.value(module.dictionary).view(K, HEADS, DIM // HEADS).transpose(0, 1)  # (H, K, d)
    cross = branch.out((dictionary.probs @ values).transpose(1, 2).flatten(2))  # (B, Nq, dim)
    in_sample = module.in_sample.value(context).view(2, 6, HEADS, DIM // HEADS).transpose(1, 2)  # (B, H, Nk, d)
    own = module.in_sample.out((vision.probs @ in_sample).transpose(1, 2).flatten(2))  # (B, Nq, dim)
    recomputed = module.combine(torch.cat([own, cross], -1)) * QUERY_MASK[..., None]
    torch.testing.assert_close(recomputed, out.detach())


def test_replacing_the_recorded_cs_probabilities_changes_the_output():
    module = _module(torch.float64)
    queries, context = _inputs(torch.float64)
    with torch.no_grad():
        reference = module(queries, context, CONTEXT_MASK, QUERY_MASK)[0]
        handle = module.cross_sample.attn_drop.register_forward_hook(
            lambda _m, _i, probs: torch.full_like(probs, 1.0 / K) * QUERY_MASK[:, None, :, None])
        uniform = module(queries, context, CONTEXT_MASK, QUERY_MASK)[0]
        handle.remove()
    mean_value = module.cross_sample.value(module.dictionary).mean(0)  # uniform attention → the mean entry value
    expected_cross = module.cross_sample.out(mean_value)
    in_sample = module.in_sample(queries, context, CONTEXT_MASK, QUERY_MASK)[0]
    expected = module.combine(torch.cat([in_sample, expected_cross.expand_as(in_sample)], -1)) * QUERY_MASK[..., None]
    assert float((uniform - reference).abs().max()) > 1e-3
    torch.testing.assert_close(uniform, expected.detach())
