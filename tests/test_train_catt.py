"""The shapes-catt / shapes-catt-base recipe (`train/shapes_catt.py`) on a tiny config: the pair starts from
the same weights, a few steps write two loadable model folders, and the CATT folder's dictionary is the k-means
of the trained base model's tokens, kept frozen through CATT's training."""
from __future__ import annotations

import json

import torch

TINY = {"model": {"dim": 16, "heads": 2, "question_layers": 1, "vision_layers": 2, "fusion_layers": 1,
                  "max_tokens": 32, "dictionary_size": 6, "dropout": 0.0},
        "regions": {"grid": [4, 4], "cell": 8, "stem": {"widths": [8, 16, 16]}}, "image_size": 32}


def test_pair_starts_from_the_same_weights(tmp_path):
    from xattn_cli.train.shapes_catt import initial_pair
    from xattn_cli.train.shapes_vqa import write_tokenizer

    catt, catt_head, base, base_head = initial_pair(TINY, write_tokenizer(tmp_path), seed=4)
    shared = catt.model.state_dict()
    for key, value in base.model.state_dict().items():
        assert torch.equal(value, shared[key]), key
    assert {key for key in shared if key not in base.model.state_dict()} >= {"vision.1.attention.dictionary",
                                                                             "vision.1.attention.combine.weight"}
    for one, other in [(catt.regions.stem, base.regions.stem), (catt_head, base_head)]:
        for (key, value), (_, twin) in zip(one.state_dict().items(), other.state_dict().items()):
            assert torch.equal(value, twin), key
    again, *_ = initial_pair(TINY, write_tokenizer(tmp_path), seed=4)
    assert all(torch.equal(value, again.model.state_dict()[key]) for key, value in shared.items())


def test_recipe_writes_loadable_folders(tmp_path):
    from xattn_cli.dictionary import kmeans, load_dictionary
    from xattn_cli.models.registry import load_model
    from xattn_cli.train import shapes_catt
    from xattn_cli.world.shapes import ColourRule, scene_at

    config = tmp_path / "catt.json"
    config.write_text(json.dumps(TINY))
    out = tmp_path / "run"
    recipes = shapes_catt.main(["--out", str(out), "--steps", "3", "--batch-size", "4", "--eval-every", "2",
                                "--eval-scenes", "4", "--warmup", "1", "--workers", "0", "--dictionary-scenes", "4",
                                "--config", str(config)])
    assert recipes["shapes-catt"]["colour_rule"] == "biased:0.9"
    base, catt = load_model(f"hf:{out / 'shapes-catt-base'}"), load_model(f"hf:{out / 'shapes-catt'}")
    assert base.model.causal is None and catt.dictionary_size == 6
    for folder in ("shapes-catt-base", "shapes-catt"):
        steps = [json.loads(line)["step"] for line in (out / folder / "log.jsonl").read_text().splitlines()]
        assert steps == [0, 1, 2]

    saved = load_dictionary(out / "shapes-catt" / "dictionary.safetensors", k=6, dim=16)
    assert saved.names == [f"train-3/{index}" for index in range(4)] and saved.info["members_from"] == "shapes-catt"
    rule = ColourRule.parse("biased:0.9")
    images = [scene_at(3, index, size=32, colour_rule=rule).image for index in range(4)]
    base_tokens = base.dictionary_features(images).features.reshape(-1, 16)  # (4·16, 16)
    torch.testing.assert_close(saved.entries, kmeans(base_tokens, 6, seed=0).centroids.float())
    torch.testing.assert_close(catt.model.causal.dictionary, saved.entries)
    catt_tokens = catt.dictionary_features(images).features.reshape(-1, 16)  # members: CATT's own tokens
    nearest = torch.cdist(saved.entries.double(), catt_tokens.double()).argmin(1)  # (K,)
    assert (saved.members[:, 0, 0] * 16 + saved.members[:, 0, 1]).tolist() == nearest.tolist()


def test_recipe_records_its_world_styles_and_builds_the_dictionary_on_the_training_style(tmp_path):
    from xattn_cli.dictionary import kmeans, load_dictionary
    from xattn_cli.models.registry import load_model
    from xattn_cli.train import shapes_catt
    from xattn_cli.world.shapes import ColourRule, scene_at

    config = tmp_path / "catt.json"
    config.write_text(json.dumps(TINY))
    out = tmp_path / "run"
    recipes = shapes_catt.main(["--out", str(out), "--steps", "1", "--batch-size", "4", "--eval-scenes", "4",
                                "--warmup", "1", "--workers", "0", "--dictionary-scenes", "4", "--config",
                                str(config), "--style", "varied", "--eval-style", "shifted"])
    for folder, recipe in recipes.items():
        assert recipe["style"] == "varied" and recipe["held_out"]["style"] == "shifted", folder
        assert json.loads((out / folder / "xattn.json").read_text())["recipe"] == recipe
    base = load_model(f"hf:{out / 'shapes-catt-base'}")
    rule = ColourRule.parse("biased:0.9")
    images = [scene_at(3, index, size=32, colour_rule=rule, style="varied").image for index in range(4)]
    base_tokens = base.dictionary_features(images).features.reshape(-1, 16)  # (4·16, 16)
    saved = load_dictionary(out / "shapes-catt" / "dictionary.safetensors", k=6, dim=16)
    torch.testing.assert_close(saved.entries, kmeans(base_tokens, 6, seed=0).centroids.float())
