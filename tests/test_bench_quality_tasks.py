"""`bench quality` on the VQA and detection models: their targets, perturbation scores against literal
blackouts and token removal, fixed-target maps, sanity blocks, and the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from xattn_cli.cli.app import app
from xattn_cli.eval.quality import DetectionTask, VqaTask, default_models, held_out_scenes, sanity_blocks
from xattn_cli.explainers.detection import DetectionRelevancy
from xattn_cli.explainers.vqa import VqaRelevancy
from xattn_cli.models.registry import load_model
from xattn_cli.models.regions import Regions

runner = CliRunner()


@pytest.fixture(scope="module")
def lxmert():
    return load_model("shapes-lxmert", device="cpu")


@pytest.fixture(scope="module")
def detr():
    return load_model("shapes-detr", device="cpu")


@pytest.fixture(scope="module")
def scene():
    return held_out_scenes(1)[0][1]


def keep_rows(tokens: int, seed: int = 0) -> torch.Tensor:
    """A few keep masks: all, a random half, one token, none. (4, tokens) bool."""
    half = torch.rand(tokens, generator=torch.Generator().manual_seed(seed)) < 0.5
    one = torch.zeros(tokens, dtype=torch.bool)
    one[tokens // 3] = True
    return torch.stack([torch.ones(tokens, dtype=torch.bool), half, one, torch.zeros(tokens, dtype=torch.bool)])


def blacked_out(image: Image.Image, keep: torch.Tensor, grid: tuple[int, int]) -> Image.Image:
    """The image with the cells of the removed tokens painted black, drawn cell by cell."""
    copy = image.convert("RGB").copy()
    draw = ImageDraw.Draw(copy)
    rows, cols = grid
    cell_h, cell_w = image.height / rows, image.width / cols
    for index in np.flatnonzero(~keep.numpy()):
        row, col = divmod(int(index), cols)
        draw.rectangle([round(col * cell_w), round(row * cell_h),
                        round((col + 1) * cell_w) - 1, round((row + 1) * cell_h) - 1], fill=(0, 0, 0))
    return copy


def test_vqa_targets_are_the_questions_about_one_object_for_the_answer_the_model_gives(lxmert, scene):
    targets = VqaTask(lxmert).targets(scene)
    about_one = [qa for qa in scene.qa if qa["object"] is not None]
    assert [question for (question, _), _ in targets] == [qa["question"] for qa in about_one]
    explained = VqaRelevancy(lxmert, [qa["question"] for qa in about_one]).explain([scene.image])[0]
    assert [answer for (_, answer), _ in targets] == [target.extra["index"] for target in explained]
    for (_, mask), qa in zip(targets, about_one):
        assert np.array_equal(mask, scene.objects[qa["object"]].mask)


@pytest.mark.parametrize("name", ["shapes-lxmert", "shapes-visualbert"])
def test_vqa_scores_equal_a_literal_blackout_and_the_kept_regions_alone(name, scene):
    adapter = load_model(name, device="cpu")
    pixels_task, attention_task = VqaTask(adapter, "pixels"), VqaTask(adapter, "attention")
    (question, answer), _ = pixels_task.targets(scene)[0]
    keep = keep_rows(64)[:3]  # removing every region leaves nothing to run "alone"
    blacked = pixels_task.scorers(scene.image, [(question, answer)])[0](keep)
    masked = attention_task.scorers(scene.image, [(question, answer)])[0](keep)
    batch = adapter.tokenize([question])
    whole = adapter.regions([scene.image])
    for row, kept in enumerate(keep):
        with torch.no_grad():
            regions = adapter.regions([blacked_out(scene.image, kept, pixels_task.grid)])
            literal = adapter.answer_logits(batch, regions).softmax(dim=-1)[0, answer]
            alone = Regions(whole.features[:, kept], whole.boxes[:, kept], whole.mask[:, kept], None)
            dropped = adapter.answer_logits(batch, alone).softmax(dim=-1)[0, answer]
        assert float(blacked[row]) == pytest.approx(float(literal), abs=1e-5)
        assert float(masked[row]) == pytest.approx(float(dropped), abs=1e-5)
    assert float(blacked[0]) == pytest.approx(float(masked[0]), abs=1e-6)  # nothing removed: the same input


def test_regions_repeat_copies_one_image_and_masks_out_what_is_not_kept():
    regions = Regions(torch.randn(1, 4, 3), torch.rand(1, 4, 4), torch.tensor([[1.0, 1.0, 1.0, 0.0]]), (2, 2))
    keep = torch.tensor([[True, False, True, True], [False, False, False, True]])
    repeated = regions.repeat(2, keep)
    assert torch.equal(repeated.features, regions.features.expand(2, -1, -1))
    assert torch.equal(repeated.boxes, regions.boxes.expand(2, -1, -1))
    assert repeated.mask.tolist() == [[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    assert repeated.grid == (2, 2) and regions.repeat(3).mask.tolist() == [[1.0, 1.0, 1.0, 0.0]] * 3


def test_detection_targets_match_objects_of_their_class(detr, scene):
    task = DetectionTask(detr)
    assert task.grid == (8, 8)
    targets = task.targets(scene)
    assert targets, "the bundled detector finds the held-out scene's objects"
    shapes_by_mask = {obj.mask.tobytes(): obj.shape for obj in scene.objects}
    assert len({mask.tobytes() for _, mask in targets}) == len(targets)  # each object at most once
    for (query, label), mask in targets:
        assert detr.labels[label] == shapes_by_mask[mask.tobytes()]


def test_detection_scores_equal_a_literal_blackout(detr, scene):
    task = DetectionTask(detr)
    (query, label), _ = task.targets(scene)[0]
    keep = keep_rows(64)
    scores = task.scorers(scene.image, [(query, label)])[0](keep)
    for row, kept in enumerate(keep):
        with torch.no_grad():
            logits, _ = detr.detect(detr.preprocess([blacked_out(scene.image, kept, task.grid)], detr.native_size))
        assert float(scores[row]) == pytest.approx(float(logits.softmax(dim=-1)[0, query, label]), abs=1e-5)


def test_detection_relevancy_explains_given_queries_as_it_explains_its_detections(detr, scene):
    found = DetectionRelevancy(detr).explain([scene.image])[0]
    assert len(found) >= 2
    pairs = [(target.extra["query"], detr.labels.index(target.extra["label"])) for target in found][::-1]
    given = DetectionRelevancy(detr, queries=pairs, threshold=1.0).explain([scene.image])[0]
    assert [t.extra["query"] for t in given] == [query for query, _ in pairs]
    for target, again in zip(found[::-1], given):
        assert np.allclose(target.map, again.map, atol=1e-6) and target.score == pytest.approx(again.score)


def test_sanity_blocks_are_the_blocks_the_image_passes_through_bottom_first(lxmert, detr):
    encoder = lxmert.model.lxmert.encoder
    assert [id(b) for b in sanity_blocks(lxmert, VqaTask.sanity_streams)] == [
        id(b) for b in (*encoder.r_layers, *encoder.x_layers)]
    detr_model = detr.model.model
    assert [id(b) for b in sanity_blocks(detr, DetectionTask.sanity_streams)] == [
        id(b) for b in (*detr_model.encoder.layers, *detr_model.decoder.layers)]
    visualbert = load_model("shapes-visualbert", device="cpu")
    assert [id(b) for b in sanity_blocks(visualbert, VqaTask.sanity_streams)] == [
        id(b) for b in visualbert.model.visual_bert.encoder.layer]
    catt = load_model("shapes-catt", device="cpu")
    assert [id(b) for b in sanity_blocks(catt, VqaTask.sanity_streams)] == [
        id(b) for b in (*catt.model.vision, *catt.model.fusion)]


def test_every_bundled_model_is_measured_by_default_and_detectors_refuse_attention_masks():
    assert {"shapes-clip", "shapes-vit", "shapes-lxmert", "shapes-visualbert", "shapes-detr"} <= set(default_models())
    assert "shapes-detr" not in default_models("attention") and "shapes-lxmert" in default_models("attention")
    result = runner.invoke(app, ["bench", "quality", "--models", "shapes-detr", "--perturb", "attention"])
    assert result.exit_code == 2
    assert "shapes-detr takes no attention perturbation" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_measures_vqa_and_detection_models_with_sanity(tmp_path, lxmert, detr):
    result = runner.invoke(app, ["bench", "quality", "--models", "shapes-lxmert,shapes-detr", "--scenes", "2",
                                 "--methods", "chefer,raw,random", "--sanity", "--sanity-scenes", "1",
                                 "--resamples", "100", "--device", "cpu", "-q", "--json", str(tmp_path / "q.json")])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "q.json").read_text())
    scenes = [scene for _, scene in held_out_scenes(2)]
    expected = {"shapes-lxmert": sum(len(VqaTask(lxmert).targets(s)) for s in scenes),
                "shapes-detr": sum(len(DetectionTask(detr).targets(s)) for s in scenes)}
    assert [(row["model"], row["method"]) for row in saved["rows"]] == [
        (model, method) for model in ("shapes-lxmert", "shapes-detr") for method in ("chefer", "raw", "random")]
    for row in saved["rows"]:
        assert row["targets"] == expected[row["model"]]
        for metric in ("pointing", "miou", "energy", "auc_positive", "auc_negative"):
            assert 0 <= row[metric]["low"] <= row[metric]["mean"] <= row[metric]["high"] <= 1
    curves = {(row["model"], row["method"]): row["spearman"] for row in saved["sanity"]["rows"]}
    assert len(curves[("shapes-lxmert", "chefer")]) == 4 and len(curves[("shapes-detr", "chefer")]) == 5
    assert curves[("shapes-detr", "random")] == [1.0] * 5


def test_held_out_scenes_in_another_style_keep_their_objects_and_unknown_styles_are_refused(tmp_path):
    classic, shifted = held_out_scenes(3), held_out_scenes(3, style="shifted")
    assert [ident for ident, _ in classic] == [ident for ident, _ in shifted]
    for (_, a), (_, b) in zip(classic, shifted):
        assert len(a.objects) == len(b.objects)
        assert not np.array_equal(np.asarray(a.image), np.asarray(b.image))
    result = runner.invoke(app, ["bench", "quality", "--models", "shapes-vit", "--style", "shifted", "--scenes", "1",
                                 "--methods", "centre", "--resamples", "100", "-q", "--json", str(tmp_path / "q.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "q.json").read_text())["data"] == "held-out shapes world, seed 40000, style shifted"
    for args, message in ((["--style", "painted"], "unknown style 'painted'"),
                          (["--style", "varied", "--data", str(tmp_path)], "--style draws generated scenes")):
        refused = runner.invoke(app, ["bench", "quality", "--models", "shapes-vit", *args])
        assert refused.exit_code == 2 and message in refused.stderr, refused.output
        assert len(refused.stderr.strip().splitlines()) == 1
