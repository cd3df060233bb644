"""Prompt templates and the word tokenizer."""
from __future__ import annotations

from xattn_cli.text import WordTokenizer, build_vocabulary, ensemble_templates


def test_templates_are_the_80_openai_plus_5_scene_ones():
    templates = ensemble_templates()
    assert len(templates) == 85 and len(set(templates)) == 85
    assert all(t.count("{}") == 1 for t in templates)
    assert templates[-1] == "this is one {} in the scene."


def test_end_token_has_the_largest_id_and_padding_is_zero(tmp_path):
    tokenizer = WordTokenizer(build_vocabulary(["a red circle"]), context_length=8)
    tokens = tokenizer(["a red circle", "a zebra of many many many many words"])
    end = len(tokenizer.vocab) - 1
    assert tokens.shape == (2, 8)
    assert tokens[0].tolist()[:5] == [2, tokenizer.ids["a"], tokenizer.ids["red"], tokenizer.ids["circle"], end]
    assert tokens[0, 5:].eq(0).all()
    assert tokens[1, -1] == end and tokens[1].argmax() == 7  # truncated, still ends with <end>
    assert tokenizer.ids["<unk>"] in tokens[1].tolist()  # "zebra" is not in the vocabulary
    tokenizer.save(tmp_path / "vocab.txt")
    assert WordTokenizer.from_file(tmp_path / "vocab.txt", 8).vocab == tokenizer.vocab
