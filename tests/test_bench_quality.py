"""`xattn bench quality`: data, the evaluation loop on an oracle with known answers, sanity, and the CLI."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from xattn_cli.cli.app import app
from xattn_cli.errors import UsageError
from xattn_cli.eval.metrics import pool_to_tokens
from xattn_cli.eval.quality import (ClipTask, PatchTask, centre_map, check_names, evaluate, held_out_scenes,
                                    load_dataset, random_map, sanity_blocks, sanity_cascade, scene_targets, summarise)
from xattn_cli.models.layout import LAYOUTS
from xattn_cli.world.export import export_dataset
from xattn_cli.world.shapes import scene_at

runner = CliRunner()


def shares_colour_or_shape(scene) -> bool:
    objects = scene.objects
    return len({o.color for o in objects}) < len(objects) or len({o.shape for o in objects}) < len(objects)


def test_held_out_scenes_are_fixed_and_include_shared_colours_or_shapes():
    scenes = held_out_scenes(12)
    again = held_out_scenes(12)
    assert [ident for ident, _ in scenes] == [ident for ident, _ in again]
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for (_, a), (_, b) in zip(scenes, again))
    assert {len(scene.objects) for _, scene in scenes} == {2, 3, 4}
    assert sum(shares_colour_or_shape(scene) for _, scene in scenes) >= 4


def test_a_target_named_by_two_objects_has_the_union_of_their_masks():
    scene = next(scene for _, scene in held_out_scenes(30)
                 if len({o.shape for o in scene.objects}) < len(scene.objects))
    by_shape = dict(scene_targets(scene, lambda obj: obj.shape))
    assert len(by_shape) == len({o.shape for o in scene.objects})
    for shape, mask in by_shape.items():
        union = np.logical_or.reduce([o.mask for o in scene.objects if o.shape == shape])
        assert np.array_equal(mask, union)
    assert [name for name, _ in scene_targets(scene, ClipTask.target_of)] == [o.caption for o in scene.objects]


def test_dataset_folder_round_trip(tmp_path):
    export_dataset(tmp_path, 3, seed=4, size=48)
    loaded = load_dataset(tmp_path)
    assert [ident for ident, _ in loaded] == ["000000", "000001", "000002"]
    for index, (_, scene) in enumerate(loaded):
        original = scene_at(4, index, size=48)
        assert np.array_equal(np.asarray(scene.image), np.asarray(original.image))
        assert [(o.shape, o.color) for o in scene.objects] == [(o.shape, o.color) for o in original.objects]
        assert all(np.array_equal(a.mask, b.mask) for a, b in zip(scene.objects, original.objects))


def test_cli_reads_a_dataset_folder(tmp_path):
    export_dataset(tmp_path / "data", 2, seed=4, size=48)
    result = runner.invoke(app, ["bench", "quality", "--data", str(tmp_path / "data"), "--models", "shapes-vit",
                                 "--methods", "centre", "--resamples", "100", "--device", "cpu", "-q",
                                 "--json", str(tmp_path / "q.json")])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "q.json").read_text())
    shapes = sum(len({o.shape for o in scene_at(4, i, size=48).objects}) for i in range(2))
    assert saved["data"] == str(tmp_path / "data") and saved["scenes"] == 2
    assert [(row["method"], row["targets"]) for row in saved["rows"]] == [("centre", shapes)]


def test_a_label_the_classifier_lacks_is_a_usage_error(tmp_path):
    export_dataset(tmp_path, 1, seed=0, size=32)
    annotations = tmp_path / "annotations.jsonl"
    record = json.loads(annotations.read_text())
    record["objects"][0]["shape"] = "hexagon"
    annotations.write_text(json.dumps(record) + "\n")
    result = runner.invoke(app, ["bench", "quality", "--data", str(tmp_path), "--models", "shapes-vit"])
    assert result.exit_code == 2
    assert "unknown target 'hexagon'" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_baseline_maps():
    centre = centre_map((64, 48))
    assert centre.shape == (48, 64)
    peaks = np.argwhere(centre == centre.max())
    assert {tuple(p) for p in peaks} == {(23, 31), (23, 32), (24, 31), (24, 32)}
    noise = random_map((64, 48), (1, 2, 3))
    assert noise.shape == (48, 64) and 0 <= noise.min() and noise.max() < 1
    assert np.array_equal(noise, random_map((64, 48), (1, 2, 3)))
    assert not np.array_equal(noise, random_map((64, 48), (1, 2, 4)))


class OracleTask(PatchTask):
    """Maps are the ground-truth masks themselves; the score is the share of the target's patches kept."""

    methods = ("oracle",)

    def __init__(self, scenes):
        adapter = SimpleNamespace(native_size=(64, 64), patch_size=(8, 8), mean=(0.0,) * 3, std=(1.0,) * 3,
                                  layout=LAYOUTS["vit"], name="oracle")
        super().__init__(adapter)
        self.truth = {id(scene.image): dict(scene_targets(scene, self.target_of)) for _, scene in scenes}

    @staticmethod
    def target_of(obj):
        return obj.caption

    def maps(self, method, image, targets):
        return [self.truth[id(image)][target].astype(np.float32) for target in targets]

    def scorers(self, image, targets):
        return [self.kept_share(pool_to_tokens(self.truth[id(image)][t].astype(np.float32), self.grid)) for t in targets]

    @staticmethod
    def kept_share(weights):  # (N,) share of the target in each patch
        return lambda keep: (keep.float() * weights).sum(dim=1) / weights.sum()  # (S,)


def test_evaluate_scores_an_oracle_perfectly_and_the_floors_below_it():
    scenes = held_out_scenes(6)
    values = evaluate(OracleTask(scenes), scenes, ["oracle", "centre", "random"])
    targets = sum(len(scene.objects) for _, scene in scenes)
    oracle = summarise(values["oracle"], resamples=200)
    assert oracle["targets"] == targets
    for metric in ("pointing", "miou", "energy"):
        assert oracle[metric]["mean"] == pytest.approx(1.0)
    for floor in ("centre", "random"):
        summary = summarise(values[floor], resamples=200)
        assert summary["pointing"]["mean"] < 0.5 and summary["energy"]["mean"] < 0.5
        assert oracle["auc_positive"]["mean"] < summary["auc_positive"]["mean"]
        assert oracle["auc_negative"]["mean"] > summary["auc_negative"]["mean"]
        low, mean, high = (summary["energy"][key] for key in ("low", "mean", "high"))
        assert low <= mean <= high


def test_sanity_cascade_flags_model_independent_maps_and_restores_the_model(vit_adapter):
    scenes = [(str(i), scene_at(9, i, size=32, n_objects=2)) for i in range(2)]
    task = ClipTask(vit_adapter, {obj.caption for _, scene in scenes for obj in scene.objects})
    blocks = sanity_blocks(vit_adapter)
    assert [b is r for b, r in zip(blocks, vit_adapter.model.visual.transformer.resblocks)] == [True] * 4
    before = {name: tensor.clone() for name, tensor in vit_adapter.model.state_dict().items()}
    curves = sanity_cascade(task, scenes, ["raw", "centre"])
    assert curves["centre"] == [1.0] * 4
    assert len(curves["raw"]) == 4 and curves["raw"][-1] < 0.5
    after = vit_adapter.model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_cli_runs_both_bundled_models_and_writes_json_and_plot(tmp_path):
    result = runner.invoke(app, ["bench", "quality", "--models", "shapes-clip,shapes-vit", "--scenes", "2",
                                 "--methods", "surgery,chefer", "--methods",
                                 "random", "--sanity", "--sanity-scenes", "1", "--resamples", "200", "--device", "cpu",
                                 "--json", str(tmp_path / "run" / "quality.json"), "--plot", str(tmp_path / "q.png")])
    assert result.exit_code == 0, result.output
    assert "shapes-vit: skipped surgery" in result.stderr
    table = result.stdout.splitlines()
    assert table[0].startswith("| model | method | targets | pointing")
    saved = json.loads((tmp_path / "run" / "quality.json").read_text())
    assert [(row["model"], row["method"]) for row in saved["rows"]] == [
        ("shapes-clip", "surgery"), ("shapes-clip", "chefer"), ("shapes-clip", "random"),
        ("shapes-vit", "chefer"), ("shapes-vit", "random")]
    for row in saved["rows"]:
        assert f"| {row['model']} | {row['method']} | {row['targets']} | {row['pointing']['mean']:.3f}" in result.stdout
        for metric in ("pointing", "miou", "energy", "auc_positive", "auc_negative"):
            assert 0 <= row[metric]["low"] <= row[metric]["mean"] <= row[metric]["high"] <= 1
    flagged = {(row["model"], row["method"]): row["flagged"] for row in saved["sanity"]["rows"]}
    assert flagged[("shapes-clip", "random")] and flagged[("shapes-vit", "random")]
    assert not flagged[("shapes-clip", "surgery")]
    assert (tmp_path / "q.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def malformed(tmp_path, line: str):
    export_dataset(tmp_path, 1, seed=0, size=32)
    (tmp_path / "annotations.jsonl").write_text((tmp_path / "annotations.jsonl").read_text() + line + "\n")
    return tmp_path


@pytest.mark.parametrize("args, message", [
    (["--data", "{tmp}/missing"], "no such folder"),
    (["--data", "{tmp}"], "no annotations.jsonl"),
    (["--models", "nope"], "unknown model 'nope'"),
    (["--methods", "chefer,nope"], "unknown method 'nope'"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    result = runner.invoke(app, ["bench", "quality", *[a.format(tmp=tmp_path) for a in args]])
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("line, message", [
    ("{not json", "annotations.jsonl:2:"),
    ('{"id": "x", "image": "images/000000.png"}', "annotations.jsonl:2: missing key 'objects'"),
    ('{"id": "x", "image": "images/000000.png", "objects": [{"k": 0, "shape": "star", "color": "red", '
     '"mask": "masks/gone.png"}]}', "annotations.jsonl:2:"),
])
def test_malformed_annotations_are_one_line_and_exit_2(tmp_path, line, message):
    folder = malformed(tmp_path, line)
    result = runner.invoke(app, ["bench", "quality", "--data", str(folder), "--models", "shapes-vit"])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_memoised_scores_each_distinct_keep_mask_once():
    from xattn_cli.eval.quality import memoised

    calls = []

    def score(keep):
        calls.append(keep.shape[0])
        return keep.float().sum(dim=1)  # (S,)

    cached = memoised(score)
    first = torch.tensor([[True, True], [True, False], [True, True]])
    assert cached(first).tolist() == [2.0, 1.0, 2.0]
    assert cached(torch.tensor([[False, True], [True, False]])).tolist() == [1.0, 1.0]
    assert calls == [2, 1]


def literal_attention_auc(adapter, scene, relevance: np.ndarray, label: str, most_relevant_first: bool) -> float:
    """Perturbation AUC written out: tokens removed in relevance order, their keys masked through TokenMask."""
    from xattn_cli.capture import TokenMask
    from xattn_cli.eval.metrics import PERTURBATION_STEPS

    pixels = adapter.preprocess([scene.image], adapter.native_size)  # (1, 3, H, W)
    sites = [site for site in adapter.attention_sites() if site.stream == "vision"]
    order = sorted(range(relevance.size), key=lambda i: -relevance[i] if most_relevant_first else relevance[i])
    curve = []
    for fraction in PERTURBATION_STEPS:
        removed = set(order[:round(fraction * relevance.size)])
        keep = torch.tensor([[1.0] + [0.0 if i in removed else 1.0 for i in range(relevance.size)]])  # CLS first
        with torch.no_grad(), TokenMask(sites, keep):
            logits = adapter.classify(pixels)
        curve.append(float(torch.sigmoid(logits[0, adapter.target_index(label)])))
    steps = PERTURBATION_STEPS
    return sum((steps[i + 1] - steps[i]) * (curve[i] + curve[i + 1]) / 2 for i in range(len(steps) - 1))


def test_cli_measures_token_masks_and_perturbs_attention_as_token_mask_does(tmp_path):
    from xattn_cli.eval.quality import RANDOM_MAP_SEED
    from xattn_cli.models.registry import load_model

    args = ["bench", "quality", "--scenes", "1", "--resamples", "100", "--device", "cpu", "-q"]
    result = runner.invoke(app, [*args, "--models", "shapes-clip", "--models", "shapes-vit", "--methods", "mask,random",
                                 "--perturb", "attention",
                                 "--json", str(tmp_path / "attention.json")])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "attention.json").read_text())
    assert saved["perturb"] == "attention"
    rows = {(row["model"], row["method"]): row for row in saved["rows"]}
    assert set(rows) == {(model, method) for model in ("shapes-clip", "shapes-vit") for method in ("mask", "random")}
    _, scene = held_out_scenes(1)[0]
    for model, target_of in (("shapes-clip", ClipTask.target_of), ("shapes-vit", lambda obj: obj.shape)):
        mask_row = rows[(model, "mask")]
        assert mask_row["targets"] == len(scene_targets(scene, target_of))
        for metric in ("pointing", "miou", "energy", "auc_positive", "auc_negative"):
            assert 0 <= mask_row[metric]["low"] <= mask_row[metric]["mean"] <= mask_row[metric]["high"] <= 1

    adapter = load_model("shapes-vit", device="cpu")
    shapes = [shape for shape, _ in scene_targets(scene, lambda obj: obj.shape)]
    for metric, most_relevant_first in (("auc_positive", True), ("auc_negative", False)):
        aucs = []
        for k, shape in enumerate(shapes):
            noise = random_map(scene.image.size, (RANDOM_MAP_SEED, 0, k)).astype(np.float64)  # (64, 64)
            relevance = noise.reshape(8, 8, 8, 8).mean(axis=(1, 3)).ravel()  # (64,) mean per 8-pixel patch
            aucs.append(literal_attention_auc(adapter, scene, relevance, shape, most_relevant_first))
        assert rows[("shapes-vit", "random")][metric]["mean"] == pytest.approx(np.mean(aucs), abs=1e-6)

    pixels = runner.invoke(app, [*args, "--models", "shapes-vit", "--methods", "random",
                                 "--json", str(tmp_path / "p.json")])
    assert pixels.exit_code == 0, pixels.output
    blacked = json.loads((tmp_path / "p.json").read_text())
    masked_auc = rows[("shapes-vit", "random")]["auc_positive"]["mean"]
    assert blacked["perturb"] == "pixels" and blacked["rows"][0]["auc_positive"]["mean"] != pytest.approx(masked_auc)


def test_an_unknown_perturbation_is_refused_with_exit_2():
    result = runner.invoke(app, ["bench", "quality", "--perturb", "blur", "--models", "shapes-vit"])
    assert result.exit_code == 2
    assert "'blur' is not one of 'pixels', 'attention'" in result.stderr
    with pytest.raises(UsageError, match="unknown perturbation 'blur'"):
        check_names(["shapes-vit"], ["chefer"], "blur")
