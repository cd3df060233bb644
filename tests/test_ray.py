"""Ray Data: `explain_dataset` on a local Ray instance gives, image for image, the records and maps that
`xattn surgery` writes for the same scenes, whether the images come as paths or as bytes."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from typer.testing import CliRunner

from xattn_cli.cli.app import app
from xattn_cli.errors import UsageError

if os.environ.get("XATTN_REQUIRE_RAY") == "1":
    import ray  # CI installs the [ray] extra: without it this test fails instead of skipping
else:
    ray = pytest.importorskip("ray")

from xattn_cli.integrations.ray import ExplainBatch, explain_dataset

TEXTS = ["a red circle", "a blue star"]
SCENES = 30


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """30 shapes scenes and one file that is no image, in one folder."""
    folder = tmp_path_factory.mktemp("ray-scenes")
    result = CliRunner().invoke(app, ["world", "export", str(folder), "--n", str(SCENES), "--size", "64"])
    assert result.exit_code == 0, result.output
    images = folder / "images"
    (images / "broken.png").write_bytes(b"not an image")
    return images


@pytest.fixture(scope="module")
def cli_records(scenes, tmp_path_factory):
    """The CLI's records of the folder, by image."""
    out = tmp_path_factory.mktemp("ray-cli")
    args = ["surgery", str(scenes), *[arg for text in TEXTS for arg in ("--text", text)], "--model", "shapes-clip",
            "--device", "cpu", "--no-text-cache", "--overlays", "none", "--save-maps", "--format", "jsonl",
            "--quiet", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output  # the broken file's error record
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == SCENES + 1
    return {record["image"]: record for record in records}


@pytest.fixture(scope="module")
def local_ray():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_USAGE_STATS_ENABLED", "0")  # nothing reported to Ray's usage server
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20, log_to_driver=False)
        yield
        ray.shutdown()


def _without_run(record: dict) -> dict:
    """The record without what differs between runs: the time taken and the output folder."""
    return {**record, "meta": {key: value for key, value in record["meta"].items() if key not in ("elapsed_ms", "out")}}


def assert_same_as_cli(row: dict, written: dict, maps: list[np.ndarray]) -> None:
    """A result row holds the CLI's record (its None columns aside); `maps` are the row's maps, target by target.
    Scores are compared to 1e-6, the resolution of the records' rounded scores."""
    record = {key: value for key, value in row.items() if key != "maps" and value is not None}
    if written["status"] != "ok":
        assert record == written and not maps
        return
    assert _without_run({**record, "targets": None}) == _without_run({**written, "targets": None})
    assert len(record["targets"]) == len(written["targets"]) == len(maps)
    for target, cli_target, explained in zip(record["targets"], written["targets"], maps):
        assert target["score"] == pytest.approx(cli_target["score"], abs=1e-6)
        other = ("score", "map")
        assert {k: v for k, v in target.items() if k not in other} == {k: v for k, v in cli_target.items()
                                                                          if k not in other}
        np.testing.assert_allclose(explained, np.load(cli_target["map"]), atol=1e-6)


def test_paths_give_the_cli_records_and_maps(scenes, cli_records, local_ray):
    ds = ray.data.from_items([{"image": image} for image in cli_records])
    rows = explain_dataset(ds, model="shapes-clip", texts=TEXTS, text_cache=False, batch_size=8).take_all()
    assert sorted(row["image"] for row in rows) == sorted(cli_records)
    for row in rows:
        maps = list(row["maps"])
        assert_same_as_cli(row, cli_records[row["image"]], maps)
        assert row["status"] == "error" or (row["meta"]["out"] is None
                                            and all(target["map"] is None for target in row["targets"]))


def test_bytes_with_maps_written_to_a_folder(scenes, cli_records, local_ray, tmp_path):
    ds = ray.data.read_binary_files(str(scenes), include_paths=True)  # columns "bytes" and "path"
    rows = explain_dataset(ds, model="shapes-clip", texts=TEXTS, text_cache=False, image_column="bytes",
                           name_column="path", maps_dir=tmp_path / "maps").take_all()
    assert sorted(row["image"] for row in rows) == sorted(cli_records)
    assert all("maps" not in row for row in rows)
    for row in rows:
        if row["status"] != "ok":  # PIL names its in-memory file otherwise; the type and the image are the CLI's
            assert row["error"]["type"] == cli_records[row["image"]]["error"]["type"] == "UnreadableImage"
            assert row["error"]["message"].startswith(f"{row['image']}: cannot decode image")
            continue
        assert row["meta"]["out"] == str(tmp_path / "maps")
        files = [target["map"] for target in row["targets"]]
        assert all(os.path.dirname(file) == str(tmp_path / "maps") for file in files)
        assert_same_as_cli(row, cli_records[row["image"]], [np.load(file) for file in files])
    assert len(list((tmp_path / "maps").iterdir())) == SCENES * len(TEXTS)  # no two images share a file name


def test_bytes_need_a_name_column(scenes):
    explain = ExplainBatch(method="surgery", model="shapes-clip", pretrained=None, texts=TEXTS,
                           options={"text_cache": False}, device="cpu", torch_threads=1, batch_size=8,
                           image_column="bytes", name_column=None, max_pixels=10**6, maps_dir=None)
    image = (scenes / "000000.png").read_bytes()
    with pytest.raises(UsageError, match="name_column"):
        explain({"bytes": np.array([image], dtype=object)})


def test_relevancy_and_mask_methods_run_as_the_api_does(scenes):
    """The actor's explainer is the API's for every kind of method (here in this process, without Ray)."""
    from xattn_cli import mask, relevancy

    paths = [str(scenes / f"00000{index}.png") for index in range(3)]
    for method, options, expected in (
            ("chefer", {}, relevancy(paths, model="shapes-vit", method="chefer", device="cpu")),
            ("mask", {"steps": 5}, mask(paths, model="shapes-vit", steps=5, device="cpu"))):
        explain = ExplainBatch(method=method, model="shapes-vit", pretrained=None, texts=[], options=options,
                               device="cpu", torch_threads=1, batch_size=8, image_column="image", name_column=None,
                               max_pixels=10**6, maps_dir=None)
        columns = explain({"image": np.array(paths)})
        assert columns["image"] == paths and columns["status"] == ["ok"] * 3
        for targets, maps, result in zip(columns["targets"], columns["maps"], expected):
            assert [target["score"] for target in targets] == [target.to_json()["score"] for target in result.targets]
            np.testing.assert_allclose(maps, result.maps, atol=1e-6)
