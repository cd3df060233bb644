"""The training recipes run, are seeded, and export weights the bundled loaders accept."""
from __future__ import annotations

import json

import pytest


@pytest.mark.parametrize("recipe, loader", [("shapes_clip", "shapes-clip"), ("shapes_vit", "shapes-vit")])
def test_recipe_exports_loadable_deterministic_weights(tmp_path, recipe, loader):
    import importlib

    from xattn_cli.models.registry import load_model

    module = importlib.import_module(f"xattn_cli.train.{recipe}")
    losses = []
    for run in ("a", "b"):
        module.main(["--work", str(tmp_path / run), "--steps", "2", "--batch-size", "8", "--eval-every", "100"])
        log = [json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
        losses.append([entry["loss"] for entry in log])
    assert losses[0] == losses[1] and len(losses[0]) == 2
    weights = tmp_path / "a" / f"{loader}.safetensors"
    adapter = load_model(loader, str(weights))
    assert adapter.name == loader


@pytest.mark.parametrize("recipe, loader", [("shapes_clip", "shapes-clip"), ("shapes_vit", "shapes-vit")])
def test_recipe_records_its_world_styles_in_the_weights(tmp_path, recipe, loader):
    import importlib

    from safetensors import safe_open

    module = importlib.import_module(f"xattn_cli.train.{recipe}")
    module.main(["--work", str(tmp_path), "--steps", "1", "--batch-size", "4", "--style", "varied",
                 "--eval-style", "shifted"])
    with safe_open(str(tmp_path / f"{loader}.safetensors"), "pt") as weights:
        metadata = weights.metadata()
    assert metadata["style"] == "varied" and metadata["eval_style"] == "shifted"


def test_clip_recipe_fine_tunes_from_exported_weights(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from xattn_cli.config import data_path, load_config
    from xattn_cli.train import shapes_clip

    bundled = data_path(load_config("shapes-clip")["weights"])
    shapes_clip.main(["--work", str(tmp_path), "--steps", "1", "--batch-size", "4", "--lr", "1e-12", "--warmup", "1",
                      "--init", str(bundled)])
    exported, initial = load_file(tmp_path / "shapes-clip.safetensors"), load_file(bundled)
    assert exported.keys() == initial.keys()
    assert all(exported[key].equal(initial[key]) for key in initial)  # a step of lr 1e-12 is lost in fp16
    with safe_open(str(tmp_path / "shapes-clip.safetensors"), "pt") as weights:
        assert weights.metadata()["init"] == str(bundled)
    with pytest.raises(SystemExit, match="init"):  # the checkpoint is a fine-tune: resuming it from scratch is refused
        shapes_clip.main(["--work", str(tmp_path), "--steps", "2", "--batch-size", "4"])
    vit_weights = data_path(load_config("shapes-vit")["weights"])
    with pytest.raises(SystemExit, match="does not fit the architecture"):  # refused in one line, nothing trained
        shapes_clip.main(["--work", str(tmp_path / "wrong"), "--steps", "1", "--init", str(vit_weights)])
    assert not (tmp_path / "wrong" / "checkpoint.pt").exists()
