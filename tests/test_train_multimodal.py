"""The shapes-lxmert / shapes-visualbert / shapes-detr recipes, on tiny configs: they fit a fixed batch, a run
killed mid-way resumes to exactly the weights of an uninterrupted one, and what they save loads as `hf:DIR` and
runs the multimodal explainers."""
from __future__ import annotations

import json
import math

import pytest
import torch

VQA_REGIONS = {"grid": [4, 4], "cell": 8, "stem": {"widths": [8, 16, 16]}}
TINY = {
    "lxmert": {"hf_config": {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64, "l_layers": 1,
                             "x_layers": 1, "r_layers": 1, "visual_pos_dim": 4, "max_position_embeddings": 16,
                             "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
               "regions": VQA_REGIONS, "image_size": 32},
    "visualbert": {"hf_config": {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64,
                                 "num_hidden_layers": 2, "max_position_embeddings": 16, "hidden_dropout_prob": 0.0,
                                 "attention_probs_dropout_prob": 0.0},
                   "regions": VQA_REGIONS, "image_size": 32},
    "detr": {"backbone_config": {"num_channels": 3, "embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1],
                                 "layer_type": "basic", "out_features": ["stage2"]},
             "hf_config": {"d_model": 32, "encoder_layers": 1, "decoder_layers": 2, "encoder_attention_heads": 2,
                           "decoder_attention_heads": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "num_queries": 10,
                           "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0, "auxiliary_loss": True,
                           "use_timm_backbone": False, "use_pretrained_backbone": False},
             "image_size": 32, "preprocess": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}},
}
FAMILIES = ["lxmert", "visualbert", "detr"]
FIT = {"lxmert": 0.5, "visualbert": 0.5, "detr": 0.9}  # loss after 30 steps / before; DETR's box terms fall slowly


def _recipe(family):
    from xattn_cli.train import shapes_detr, shapes_vqa

    return shapes_detr if family == "detr" else shapes_vqa


def _run(family, tmp_path, out, steps=5, extra=()):
    config = tmp_path / f"{family}.json"
    config.write_text(json.dumps(TINY[family]))
    family_args = [] if family == "detr" else ["--family", family]
    return _recipe(family).main(family_args + ["--out", str(out), "--steps", str(steps), "--batch-size", "4",
                                               "--eval-every", "2", "--eval-scenes", "4", "--warmup", "2",
                                               "--workers", "0", "--config", str(config), *extra])


def _fixed_batch_model(family, tmp_path):
    """The recipe's model and loss on batch 0 of its training stream (8 scenes)."""
    recipe, cfg = _recipe(family), TINY[family]
    torch.manual_seed(0)
    if family == "detr":
        model, head = recipe.build_model(cfg), recipe.cell_head(cfg)
        criterion, weights = recipe.set_loss(model.config)
        batch = recipe.training_batch(0, 8, cfg["image_size"], **cfg["preprocess"], grid=recipe.backbone_grid(cfg))
        parameters = [*model.parameters(), *head.parameters()]
        return parameters, lambda: recipe.batch_loss(model, criterion, weights, head, 0.5, batch)[0]
    adapter = recipe.build_adapter(cfg, family, recipe.write_tokenizer(tmp_path))
    batch = recipe.training_batch(0, 8, adapter.regions, cfg["image_size"])
    head = recipe.cell_head(adapter.regions.stem)
    parameters = [*adapter.model.parameters(), *adapter.regions.stem.parameters(), *head.parameters()]
    return parameters, lambda: recipe.batch_loss(adapter, head, 0.5, batch)[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_fits_a_fixed_batch(tmp_path, family):
    parameters, loss_fn = _fixed_batch_model(family, tmp_path)
    optimizer = torch.optim.Adam(parameters, lr=3e-3)
    losses = []
    for _ in range(30):
        loss = loss_fn()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < FIT[family] * losses[0], losses


@pytest.mark.parametrize("family", FAMILIES)
def test_killed_run_resumes_to_the_same_weights_and_loads_as_hf_folder(tmp_path, monkeypatch, family):
    from safetensors.torch import load_file

    from xattn_cli.explainers.detection import DetectionRelevancy
    from xattn_cli.explainers.vqa import VqaRelevancy
    from xattn_cli.models.registry import load_model
    from xattn_cli.world.shapes import scene_at

    recipe = _recipe(family)
    straight = _run(family, tmp_path, tmp_path / "straight")
    original, calls = recipe.batch_loss, []

    def dies_at_step_4(*args):  # after step 3 was logged, but the last checkpoint is step 2's
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(recipe, "batch_loss", dies_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        _run(family, tmp_path, tmp_path / "resumed")
    monkeypatch.setattr(recipe, "batch_loss", original)
    killed_log = (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in killed_log] == [0, 1, 2, 3]
    resumed = _run(family, tmp_path, tmp_path / "resumed")

    logs = [[json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
            for run in ("straight", "resumed")]
    assert [e["step"] for e in logs[1]] == [0, 1, 2, 3, 4]  # step 3 replayed once, its stale line dropped
    assert [e["loss"] for e in logs[0]] == [e["loss"] for e in logs[1]]
    assert all(math.isfinite(e["loss"]) for e in logs[0])
    weights = [load_file(str(tmp_path / run / "model.safetensors")) for run in ("straight", "resumed")]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert straight == resumed  # same held-out figures and storage choice

    adapter = load_model(f"hf:{tmp_path / 'straight'}")
    images = [scene_at(1, 0, size=40).image]
    if family == "detr":
        [targets] = DetectionRelevancy(adapter, threshold=0.0).explain(images)
        assert len(targets) == TINY["detr"]["hf_config"]["num_queries"]
        assert adapter.labels == ["circle", "square", "triangle", "star", "cross", "ring"]
    else:
        assert type(adapter.regions).__name__ == "StemGridRegions" and adapter.regions.grid == (4, 4)
        [targets] = VqaRelevancy(adapter, ["what colour is the star?"]).explain(images)
        assert targets[0].extra["answer"] in adapter.answers and len(adapter.answers) == 14
        assert "[UNK]" not in [t["token"] for t in targets[0].extra["tokens"]]
    assert targets[0].map.shape == (40, 40) and torch.isfinite(torch.as_tensor(targets[0].map)).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_run_records_its_world_styles(tmp_path, family):
    recipe = _run(family, tmp_path, tmp_path / "run", steps=1, extra=["--style", "varied", "--eval-style", "shifted"])
    saved = json.loads((tmp_path / "run" / "xattn.json").read_text())["recipe"]
    assert saved == recipe and recipe["style"] == "varied" and recipe["held_out"]["style"] == "shifted"
    default = _run(family, tmp_path, tmp_path / "default", steps=1)
    assert default["style"] == "classic" and default["held_out"]["style"] == "classic"


def test_exact_matcher_finds_the_cheapest_assignment():
    import transformers

    from xattn_cli.train.shapes_detr import ExactMatcher

    config = transformers.DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False, backbone_config={
        "model_type": "resnet"})
    logits = torch.zeros(1, 10, 7)
    boxes = torch.full((1, 10, 4), 0.2)
    logits[0, 7, 3], boxes[0, 7] = 9.0, torch.tensor([0.3, 0.3, 0.2, 0.2])
    logits[0, 2, 5], boxes[0, 2] = 9.0, torch.tensor([0.7, 0.6, 0.1, 0.3])
    targets = [{"class_labels": torch.tensor([3, 5]), "boxes": boxes[0, [7, 2]].clone()}]
    [(queries, objects)] = ExactMatcher(config)({"logits": logits, "pred_boxes": boxes}, targets)
    assert queries.tolist() == [7, 2] and objects.tolist() == [0, 1]


def test_cell_labels_name_the_object_under_each_cell():
    from xattn_cli.train import cell_labels
    from xattn_cli.world.shapes import COLORS, SHAPES, scene_at

    scene = scene_at(3, 0, size=64, n_objects=1)
    [obj] = scene.objects
    labels = cell_labels(scene, (8, 8)).view(8, 8, 2)
    centre = ((obj.box[1] + obj.box[3]) // 16, (obj.box[0] + obj.box[2]) // 16)
    far = (0 if centre[0] >= 4 else 7, 0 if centre[1] >= 4 else 7)
    assert labels[centre].tolist() == [SHAPES.index(obj.shape), COLORS.index(obj.color)]
    assert labels[far].tolist() == [len(SHAPES), len(COLORS)]


def _step_batch(step: int) -> int:
    return step * 10


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_step_loader_yields_each_step_once_in_order(workers):
    from xattn_cli.train import step_loader

    drawn = []
    for step, batch in step_loader(_step_batch, 5, workers):
        drawn.append((step, batch))
        if len(drawn) == 7:
            break
    assert drawn == [(step, step * 10) for step in range(5, 12)]


def test_resume_drops_a_log_line_cut_short_by_a_kill(tmp_path):
    from xattn_cli.train import keep_log_before

    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 0, "loss": 1.0}\n{"step": 1, "loss": 0.9}\n{"step": 2, "lo')
    keep_log_before(log, 2)
    assert log.read_text() == '{"step": 0, "loss": 1.0}\n{"step": 1, "loss": 0.9}\n'


def test_resume_under_another_world_style_or_seed_is_refused_and_the_same_options_resume(tmp_path):
    out = tmp_path / "run"
    _run("lxmert", tmp_path, out, steps=3)
    for extra, change in ((["--style", "varied"], "style 'classic' -> 'varied'"), (["--seed", "1"], "seed 0 -> 1")):
        with pytest.raises(SystemExit, match=change):
            _run("lxmert", tmp_path, out, steps=5, extra=extra)
    _run("lxmert", tmp_path, out, steps=5)  # --steps may change
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4]
