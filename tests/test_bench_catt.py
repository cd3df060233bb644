"""benchmarks/catt.py: the splits carry the confound they are named for, the CS ablations replace exactly the
tensor CS-ATT outputs, the dictionary share is the one `xattn relevancy` records, the paired differences and
the bias gate follow their definitions, and catt.md's tables render the JSON."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import load_benchmark
from test_train_catt import TINY  # the recipe's tiny config

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def catt():
    return load_benchmark("catt")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One seed's pair of tiny models, as `train.shapes_catt` writes them."""
    from xattn_cli.train import shapes_catt

    folder = tmp_path_factory.mktemp("catt")
    config = folder / "tiny.json"
    config.write_text(json.dumps(TINY))
    shapes_catt.main(["--out", str(folder / "run"), "--steps", "3", "--batch-size", "4", "--eval-every", "2",
                      "--eval-scenes", "4", "--warmup", "1", "--workers", "0", "--dictionary-scenes", "4",
                      "--config", str(config)])
    return folder / "run"


def test_shortcuts_follow_the_split_rule(catt):
    correlated, anti = catt.Split("correlated", 40, 32), catt.Split("anti", 40, 32)
    asked = [(partner, answer) for partner, (_, _, answer) in zip(correlated.shortcuts, correlated.items) if partner]
    assert len(asked) > 40 and all(partner == answer for partner, answer in asked)  # biased:1: the usual partner
    asked = [(partner, answer) for partner, (_, _, answer) in zip(anti.shortcuts, anti.items) if partner]
    assert len(asked) > 40 and all(partner != answer for partner, answer in asked)  # anti: never it
    yes_no = [partner for partner, (_, _, answer) in zip(anti.shortcuts, anti.items) if answer in ("yes", "no")]
    assert yes_no and not any(yes_no)


def test_cross_sample_ablations_replace_the_cs_output(catt, run):
    from xattn_cli.models.registry import load_model

    adapter = load_model(f"hf:{run / 'shapes-catt'}")
    adapter.model.eval()
    split = catt.Split("neutral", 1, 32)
    features = catt.stem_features(adapter, split)
    questions = [question for _, question, _ in split.items]

    def logits(replacement):
        regions = adapter.regions.regions(features.expand(len(questions), -1, -1))
        with catt.replaced_cross_sample(adapter, replacement), torch.no_grad():
            return adapter.answer_logits(adapter.tokenize(questions), regions)

    own = catt.branch_outputs(adapter, features)[1].mean(dim=0)  # one scene: the mean is its own output
    torch.testing.assert_close(logits(own), logits(None), rtol=0, atol=1e-6)
    assert (logits(torch.zeros_like(own)) - logits(None)).abs().max() > 1e-4


def test_branch_outputs_are_what_the_causal_layer_fuses(catt, run):
    from xattn_cli.models.registry import load_model

    adapter = load_model(f"hf:{run / 'shapes-catt'}")
    split = catt.Split("neutral", 3, 32)
    features = catt.stem_features(adapter, split)
    in_sample, cross_sample = catt.branch_outputs(adapter, features)  # (3, R, dim) each
    regions = adapter.regions.regions(features)
    causal = adapter.model.causal
    with torch.no_grad():
        tokens = adapter.model.causal_input(regions.features, regions.boxes, regions.mask)
        fused = causal(tokens, tokens, regions.mask, regions.mask)[0]
        torch.testing.assert_close(causal.combine(torch.cat([in_sample, cross_sample], -1)), fused)
        assert catt.fusion_contributions(adapter, in_sample, cross_sample)["cs_to_is_norm"] > 0
        causal.combine.weight[:, in_sample.shape[-1]:] = 0  # the CS half of the fusion
    assert catt.fusion_contributions(adapter, in_sample, cross_sample) == {"cs_to_is_norm": 0.0,
                                                                           "cs_to_is_norm_varying": 0.0}


def test_dictionary_share_is_the_one_relevancy_records(catt, run):
    from xattn_cli.explainers import build_relevancy
    from xattn_cli.models.registry import load_model

    adapter = load_model(f"hf:{run / 'shapes-catt'}")
    split = catt.Split("anti", 1, 32)
    split.items = split.items[:1]
    features = catt.stem_features(adapter, split)
    share = catt.dictionary_share(adapter, split, features, scenes=1)
    explainer = build_relevancy(adapter, method="chefer", questions=[split.items[0][1]])
    recorded = explainer.explain([split.scenes[0].image])[0][0].extra["dictionary_share"]
    assert share > 0 and share == pytest.approx(recorded, rel=1e-4)


def test_measure_run_scores_both_models_on_every_split(catt, run):
    splits = [catt.Split(name, 3, 32) for name in catt.SPLITS]
    figures, hits = catt.measure_run(run, splits, share_scenes=1)
    for model in (catt.BASE, catt.CATT):
        for split in splits:
            assert hits[model][split.name].shape == (len(split.items),)
            assert figures[model][split.name]["accuracy"] == pytest.approx(hits[model][split.name].mean())
    assert "shortcut_rate" in figures[catt.BASE]["anti"] and "shortcut_rate" not in figures[catt.BASE]["neutral"]
    assert set(figures[catt.CATT]["anti"]) > {"accuracy_cs_mean_ablated", "accuracy_cs_zeroed", "dictionary_share",
                                              "changed_cs_zeroed", "cs_to_is_norm"}


def _synthetic(catt, gaps: list[float]):
    """Three seeds' figures and hits over 50-question splits: CATT also right on the last 10 questions."""
    rng = np.random.default_rng(0)
    splits = [type("S", (), {"name": name})() for name in catt.SPLITS]
    runs, hits = {}, {}
    for seed, gap in enumerate(gaps):
        base = {name: (rng.random(50) < 0.6).astype(float) for name in catt.SPLITS}
        base["correlated"] = (np.arange(50) < 25 + gap * 50).astype(float)
        base["anti"] = (np.arange(50) < 25).astype(float)
        better = {name: np.maximum(base[name], np.arange(50) >= 40) for name in catt.SPLITS}
        hits[str(seed)] = {catt.BASE: base, catt.CATT: better}
        runs[str(seed)] = {model: {name: {"accuracy": float(values[name].mean())} for name in catt.SPLITS}
                           for model, values in hits[str(seed)].items()}
    return runs, hits, splits


def test_summary_follows_the_definitions(catt):
    runs, hits, splits = _synthetic(catt, [0.2, 0.3, 0.4])
    summary = catt.summarise(runs, hits, splits)
    assert summary["bias_gap"]["values"] == pytest.approx([0.2, 0.3, 0.4])
    assert summary["bias_gap"]["mean"] == pytest.approx(0.3) and summary["bias_gap"]["shows_bias"]
    for name in catt.SPLITS:
        literal = [float(np.mean(hits[s][catt.CATT][name] - hits[s][catt.BASE][name])) for s in hits]
        delta = summary["delta"][name]
        assert delta["values"] == pytest.approx(literal)
        assert delta["sd"] == pytest.approx(np.std(literal, ddof=1))
        assert delta["low"] <= delta["mean"] <= delta["high"]
    assert summary["delta"]["anti"]["effect"]  # +0.2 on each seed: sd 0, interval above 0
    assert not catt.summarise(*_synthetic(catt, [0.1, 0.1, 0.1]))["bias_gap"]["shows_bias"]


def test_catt_md_tables_render_the_json():
    cards = load_benchmark("cards")
    result = json.loads((ROOT / "benchmarks" / "catt.json").read_text())
    accuracy = cards.catt_accuracy(result)
    assert accuracy.count("\n| shapes-catt") == 6 and "from correlated to anti" in accuracy
    gap = result["summary"]["bias_gap"]
    assert ("does not show bias" in accuracy) != gap["shows_bias"]
    seeds = cards.catt_seeds(result)
    assert all(f"\n| {seed} |" in seeds for seed in result["seeds"])
    assert "| anti |" in cards.catt_usage(result)
