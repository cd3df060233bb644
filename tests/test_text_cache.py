"""The on-disk text-embedding cache: hits equal fresh encodings, keys separate what differs, damage is harmless."""
from __future__ import annotations

import torch

from helpers import TINY_VIT, tiny_openclip
from xattn_cli.cache import TextEmbeddingCache, tensor_fingerprint


def counting(adapter):
    """Count prompts the adapter encodes."""
    calls = []
    encode = adapter.encode_text
    adapter.encode_text = lambda texts: (calls.extend(texts), encode(texts))[1]
    return calls


def test_a_second_adapter_reads_the_first_ones_embeddings(tmp_path, monkeypatch):
    monkeypatch.setenv("XATTN_CACHE_DIR", str(tmp_path))
    first = tiny_openclip(TINY_VIT)
    expected = first.text_embeddings(["star", "ring"])
    second = tiny_openclip(TINY_VIT)  # same seed: same weights, a new process's view
    calls = counting(second)
    torch.testing.assert_close(second.text_embeddings(["ring", "star"]), expected.flip(0), rtol=0, atol=0)
    assert calls == []
    second.text_embeddings(["cross"])  # only the new text is encoded
    assert len(calls) == 85 and all("cross" in prompt for prompt in calls)


def test_keys_separate_weights_templates_and_disabled_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XATTN_CACHE_DIR", str(tmp_path))
    tiny_openclip(TINY_VIT).text_embeddings(["star"])
    other_weights = tiny_openclip(TINY_VIT, seed=1)
    calls = counting(other_weights)
    other_weights.text_embeddings(["star"])
    assert len(calls) == 85
    raw = tiny_openclip(TINY_VIT)
    calls = counting(raw)
    raw.text_embeddings(["star"], ensemble=False)
    assert calls == ["star"]
    uncached = tiny_openclip(TINY_VIT)
    calls = counting(uncached)
    uncached.text_embeddings(["star"], disk_cache=False)
    assert len(calls) == 85


def test_only_the_text_tower_is_in_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("XATTN_CACHE_DIR", str(tmp_path))
    tiny_openclip(TINY_VIT).text_embeddings(["star"])
    changed_vision = tiny_openclip(TINY_VIT)
    with torch.no_grad():
        changed_vision.model.visual.conv1.weight.add_(1.0)
    calls = counting(changed_vision)
    changed_vision.text_embeddings(["star"])
    assert calls == []


def test_corrupt_or_unwritable_cache_is_recomputed(tmp_path, monkeypatch):
    monkeypatch.setenv("XATTN_CACHE_DIR", str(tmp_path))
    expected = tiny_openclip(TINY_VIT).text_embeddings(["star"], disk_cache=False)
    files = list((tmp_path / "text-embeddings").glob("*.safetensors")) if (tmp_path / "text-embeddings").exists() else []
    assert files == []
    tiny_openclip(TINY_VIT).text_embeddings(["star"])
    (cached,) = (tmp_path / "text-embeddings").glob("*.safetensors")
    cached.write_bytes(b"not a safetensors file")
    torch.testing.assert_close(tiny_openclip(TINY_VIT).text_embeddings(["star"]), expected)
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("XATTN_CACHE_DIR", str(blocker / "sub"))  # cannot be created
    torch.testing.assert_close(tiny_openclip(TINY_VIT).text_embeddings(["star"]), expected)


def test_fingerprint_sees_bytes_names_and_shapes():
    weight = torch.arange(6.0).reshape(2, 3)
    base = tensor_fingerprint([("w", weight)])
    assert tensor_fingerprint([("w", weight.clone())]) == base
    assert tensor_fingerprint([("v", weight)]) != base
    assert tensor_fingerprint([("w", weight.reshape(3, 2))]) != base
    assert tensor_fingerprint([("w", weight + 1e-6)]) != base


def test_cache_round_trip(tmp_path):
    cache = TextEmbeddingCache(tmp_path, "ab" * 32)
    cache.put({"k": torch.ones(4)})
    assert torch.equal(TextEmbeddingCache(tmp_path, "ab" * 32).get("k"), torch.ones(4))
    assert TextEmbeddingCache(tmp_path, "cd" * 32).get("k") is None
