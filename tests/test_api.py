"""The Python API: `surgery(...)` and `relevancy(...)` run the CLI's batch loop and give what the CLI writes."""
from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from xattn_cli.cli.app import app
from xattn_cli.errors import UsageError
from xattn_cli.world.shapes import scene_at


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("api")
    paths = []
    for index in range(3):
        path = folder / f"scene-{index}.png"
        scene_at(21, index, size=64).image.save(path)
        paths.append(path)
    return paths


def _cli_records(args: list[str], out) -> dict[str, dict]:
    result = CliRunner().invoke(app, [*args, "--out", str(out), "--save-maps", "--format", "jsonl", "--quiet"])
    assert result.exit_code == 0, result.output
    lines = (out / "results.jsonl").read_text().splitlines()
    return {record["image"]: record for record in map(json.loads, lines)}


@pytest.mark.parametrize("batch_size", [1, 2])
def test_relevancy_api_equals_the_cli(scenes, tmp_path, batch_size):
    from xattn_cli import relevancy

    results = relevancy(scenes, model="shapes-vit", method="chefer", device="cpu", batch_size=batch_size)
    records = _cli_records(["relevancy", *map(str, scenes), "--model", "shapes-vit", "--device", "cpu"], tmp_path)
    assert [r.image for r in results] == [str(p) for p in scenes]
    for result in results:
        record = records[result.image]
        assert [t.target for t in result.targets] == [t["target"] for t in record["targets"]]
        for target, written in zip(result.targets, record["targets"]):
            # the file rounds to 6 decimals; a logit near 9 differs by an ulp (~1e-6) between batch sizes
            assert target.score == pytest.approx(written["score"], rel=1e-6, abs=1e-6)
            np.testing.assert_allclose(target.map, np.load(written["map"]), atol=1e-6)


def test_surgery_api_equals_the_cli(scenes, tmp_path):
    from xattn_cli import surgery

    texts = ["a red circle", "a blue star"]
    results = surgery(scenes, texts, device="cpu", batch_size=2, text_cache=False)
    args = ["surgery", *map(str, scenes), "--text", texts[0], "--text", texts[1], "--device", "cpu", "--no-text-cache"]
    records = _cli_records(args, tmp_path)
    for result in results:
        written = records[result.image]["targets"]
        assert result.scores == pytest.approx([t["score"] for t in written], abs=1e-6)
        np.testing.assert_allclose(result.maps, np.stack([np.load(t["map"]) for t in written]), atol=1e-6)


def test_relevancy_api_takes_each_task_its_targets(scenes):
    from xattn_cli import relevancy

    answered = relevancy(scenes[:1], model="shapes-lxmert", device="cpu", questions=["what colour is the circle?"])
    assert answered[0].targets[0].extra["question"] == "what colour is the circle?"
    with pytest.raises(UsageError, match="needs question"):
        relevancy(scenes[:1], model="shapes-lxmert", device="cpu")
    with pytest.raises(UsageError, match="threshold is for detection models"):
        relevancy(scenes[:1], model="shapes-vit", device="cpu", threshold=0.3)
