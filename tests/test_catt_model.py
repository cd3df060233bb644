"""The CATT VQA model (`models/catt.py`) from a model folder on disk, `xattn dictionary build` end to end, and
`xattn relevancy --model hf:DIR` on it: a tiny random-weight model written by the test, never registered."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

TINY = {"model": {"dim": 16, "heads": 2, "question_layers": 1, "vision_layers": 2, "fusion_layers": 1,
                  "max_tokens": 32, "dictionary_size": 6, "dropout": 0.0},
        "regions": {"grid": [4, 4], "cell": 4, "stem": {"widths": [4, 8]}}, "image_size": 32}
QUESTION = "what colour is the star?"


def _folder(path, use_dictionary: bool):
    """A tiny random CATT model folder; weights spread (σ 0.5 added) so attention is peaked and relevance
    non-trivial."""
    from xattn_cli.models.catt import build_catt, save_catt_folder
    from xattn_cli.train.shapes_vqa import ANSWERS, write_tokenizer

    path.mkdir()
    torch.manual_seed(0)
    adapter = build_catt(TINY, write_tokenizer(path), ANSWERS, use_dictionary=use_dictionary)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in [*adapter.model.parameters(), *adapter.regions.stem.parameters()]:
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.5)
        if use_dictionary:
            adapter.model.causal.load_dictionary(torch.randn(6, 16, generator=generator))
    save_catt_folder(adapter, path, TINY["regions"])
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from xattn_cli.world.export import export_dataset
    from xattn_cli.world.shapes import ColourRule

    root = tmp_path_factory.mktemp("catt")
    export_dataset(root / "scenes", 6, 12001, size=32, colour_rule=ColourRule.parse("biased:0.9"))
    (root / "scenes" / "images" / "broken.png").write_bytes(b"not an image")
    return {"catt": _folder(root / "catt", True), "base": _folder(root / "base", False),
            "scenes": root / "scenes", "root": root}


def _invoke(*args):
    from xattn_cli.cli.app import app

    return CliRunner().invoke(app, [str(arg) for arg in args])


def test_folder_loads_through_hf_prefix(folders):
    from xattn_cli.models.catt import CattAdapter
    from xattn_cli.models.registry import load_model

    adapter = load_model(f"hf:{folders['catt']}")
    assert isinstance(adapter, CattAdapter) and adapter.layout.rule == "causal" and adapter.dictionary_size == 6
    base = load_model(f"hf:{folders['base']}")
    assert base.dictionary_size == 0 and base.model.causal is None
    assert set(base.model.state_dict()) < set(adapter.model.state_dict())  # base = CATT without CS-ATT, by name


def test_dictionary_features_are_what_cs_attention_reads(folders):
    """The tokens `dictionary_features` returns are the queries the causal attention receives in a forward."""
    from xattn_cli.models.registry import load_model
    from xattn_cli.world.shapes import scene_at

    adapter = load_model(f"hf:{folders['catt']}")
    images = [scene_at(12000, i, size=32).image for i in range(2)]
    seen = []
    hook = adapter.model.causal.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].detach()))
    try:
        adapter.answer_logits(adapter.tokenize([QUESTION] * 2), adapter.regions(images, ["a", "b"]))
    finally:
        hook.remove()
    tokens = adapter.dictionary_features(images)
    assert tokens.features.shape == (2, 16, 16) and tokens.grid == (4, 4)
    torch.testing.assert_close(tokens.features, seen[0], rtol=0, atol=0)


def test_sites_record_each_stream(folders):
    from xattn_cli.capture import AttentionRecorder
    from xattn_cli.models.registry import load_model
    from xattn_cli.world.shapes import scene_at

    adapter = load_model(f"hf:{folders['catt']}")
    regions = adapter.regions([scene_at(12000, 0, size=32).image], ["a"])
    with AttentionRecorder(adapter.attention_sites()) as recording:
        adapter.answer_logits(adapter.tokenize([QUESTION]), regions).max().backward()
    layers = {key: [event.layer for event in recording.select(*key)]
              for key in [("self", "text"), ("self", "vision"), ("cross", "vision->dictionary"), ("cross", "text->vision")]}
    assert layers == {("self", "text"): [0], ("self", "vision"): [0, 1], ("cross", "vision->dictionary"): [1],
                      ("cross", "text->vision"): [0]}
    (cross_sample,) = recording.select("cross", "vision->dictionary")
    assert cross_sample.probs.shape == (1, 2, 16, 6)
    torch.testing.assert_close(cross_sample.probs.sum(-1), torch.ones(1, 2, 16))


def test_dictionary_build_then_relevancy(folders, tmp_path):
    """`xattn dictionary build` over a world export folder with one broken image: an error line, a summary,
    exit 1, a file whose entries are the k-means of the model's `dictionary_features` over the good images;
    that file in the model folder becomes the model's dictionary, and `xattn relevancy` lists its entries."""
    from xattn_cli.dictionary import kmeans, load_dictionary, region_crop
    from xattn_cli.io.images import load_image
    from xattn_cli.models.registry import load_model

    out = tmp_path / "dictionary.safetensors"
    result = _invoke("dictionary", "build", folders["scenes"], "--model", f"hf:{folders['catt']}", "--k", 6,
                     "--out", out, "--seed", 3, "--device", "cpu")
    assert result.exit_code == 1, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines[0]["status"] == "error" and lines[0]["image"].endswith("broken.png")
    assert lines[0]["error"]["type"] == "UnreadableImage"
    assert lines[-1]["status"] == "ok" and lines[-1]["images"] == 6 and lines[-1]["points"] == 6 * 16

    saved = load_dictionary(out, k=6, dim=16)
    good = sorted(p for p in (folders["scenes"] / "images").iterdir() if p.name != "broken.png")
    assert saved.names == [p.name for p in good]
    adapter = load_model(f"hf:{folders['catt']}")
    points = adapter.dictionary_features([load_image(p) for p in good]).features.reshape(-1, 16)  # (6·16, 16)
    expected = kmeans(points, 6, seed=3)
    torch.testing.assert_close(saved.entries, expected.centroids.float())
    assert saved.counts.tolist() == expected.counts.tolist()
    assert saved.members.shape == (6, 3, 2) and saved.crops.shape == (6, 3, 16, 16, 3)
    for entry in range(6):  # each entry's first member is the nearest point, its crop that grid cell
        image, region = saved.members[entry, 0].tolist()
        distances = (points - expected.centroids[entry].float()).norm(dim=1)
        assert int(distances.argmin()) == image * 16 + region
        row, col = divmod(region, 4)
        cell = region_crop(load_image(good[image]), (col / 4, row / 4, (col + 1) / 4, (row + 1) / 4))
        assert torch.equal(saved.crops[entry, 0], cell)

    model_folder = tmp_path / "model"
    shutil.copytree(folders["catt"], model_folder)
    shutil.copy(out, model_folder / "dictionary.safetensors")
    loaded = load_model(f"hf:{model_folder}")
    torch.testing.assert_close(loaded.model.causal.dictionary, saved.entries)

    scene = good[0]
    result = _invoke("relevancy", scene, "--model", f"hf:{model_folder}", "--question", QUESTION,
                     "--format", "jsonl", "--out", tmp_path / "run", "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    (record,) = [json.loads(line) for line in result.stdout.splitlines()]
    (target,) = record["targets"]
    assert target["answer"] in loaded.answers and len(target["regions"]) == 16
    assert [token["token"] for token in target["tokens"]] == ["what", "colour", "is", "the", "star", "?"]
    assert len(target["dictionary"]) == 5 and 0 < target["dictionary_share"] < 1
    relevances = [entry["relevance"] for entry in target["dictionary"]]
    assert relevances == sorted(relevances, reverse=True)
    for entry in target["dictionary"]:
        assert entry["count"] == int(saved.counts[entry["entry"]])
        assert [m["image"] for m in entry["members"]] == [saved.names[row] for row in saved.members[entry["entry"], :, 0]]
    assert Path(target["overlay"]).is_file()  # the region map painted over the image


def test_base_model_records_no_entries(folders, tmp_path):
    from PIL import Image

    from xattn_cli.explainers.vqa import VqaRelevancy
    from xattn_cli.models.registry import load_model

    adapter = load_model(f"hf:{folders['base']}")
    image = Image.open(min((folders["scenes"] / "images").glob("0*.png")))
    [[target]] = VqaRelevancy(adapter, [QUESTION]).explain([image])
    assert target.extra["dictionary"] == [] and target.extra["dictionary_share"] == 0.0
    assert len(target.extra["regions"]) == 16


def test_dictionary_build_usage_errors(folders, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "d.safetensors"
    result = _invoke("dictionary", "build", empty, "--model", f"hf:{folders['catt']}", "--out", out)
    assert result.exit_code == 2 and "no images" in result.stderr
    result = _invoke("dictionary", "build", folders["scenes"], "--model", f"hf:{folders['catt']}", "--k", 1000,
                     "--out", out, "--device", "cpu")
    assert result.exit_code == 2 and "1000 dictionary entries from 96" in result.stderr
    assert not out.exists()


def test_folder_errors(folders, tmp_path):
    from xattn_cli.dictionary import DictionaryFile, save_dictionary
    from xattn_cli.errors import UsageError
    from xattn_cli.models.registry import load_model

    wrong = tmp_path / "wrong"
    shutil.copytree(folders["catt"], wrong)
    save_dictionary(wrong / "dictionary.safetensors",
                    DictionaryFile(torch.zeros(5, 16), torch.zeros(5, dtype=torch.long),
                                   torch.zeros(5, 1, 2, dtype=torch.long), torch.zeros(5, 1, 4, 4, 3, dtype=torch.uint8),
                                   ["x.png"]))
    with pytest.raises(UsageError, match=r"holds \(5, 16\) entries, this model needs \(6, 16\)"):
        load_model(f"hf:{wrong}")
    adapter = load_model(f"hf:{folders['catt']}")
    with pytest.raises(UsageError, match="a question of 34 tokens"):
        adapter.tokenize(["star " * 32])
    (wrong / "vocab.txt").unlink()
    with pytest.raises(UsageError, match="no vocab.txt"):
        load_model(f"hf:{wrong}")


def test_last_layer_methods(folders):
    """raw and attn-gradcam through the causal branch; under raw every attention row sums to 1, so regions and
    entries get the same total (methods/causal.py) and the dictionary share is 1/2."""
    from PIL import Image

    from xattn_cli.explainers.vqa import VqaRelevancy
    from xattn_cli.models.registry import load_model

    adapter = load_model(f"hf:{folders['catt']}")
    image = Image.open(min((folders["scenes"] / "images").glob("0*.png")))
    [[raw]] = VqaRelevancy(adapter, [QUESTION], method="raw").explain([image])
    assert raw.extra["dictionary_share"] == pytest.approx(0.5, abs=1e-6) and len(raw.extra["dictionary"]) == 5
    [[gradcam]] = VqaRelevancy(adapter, [QUESTION], method="attn-gradcam").explain([image])
    assert 0 <= gradcam.extra["dictionary_share"] <= 1 and len(gradcam.extra["regions"]) == 16


@pytest.fixture(scope="module")
def swapped(folders):
    """A dictionary file `xattn dictionary build` wrote (seed 5; the broken image fails, exit 1), and a relevancy
    run of the CATT folder (random entries of its own, no dictionary file) with `--dictionary` that file."""
    built = folders["root"] / "built.safetensors"
    result = _invoke("dictionary", "build", folders["scenes"], "--model", f"hf:{folders['catt']}", "--k", 6,
                     "--out", built, "--seed", 5, "--device", "cpu")
    assert result.exit_code == 1 and built.is_file(), result.output
    scene = min((folders["scenes"] / "images").glob("0*.png"))
    out = folders["root"] / "swapped"
    result = _invoke("relevancy", scene, "--model", f"hf:{folders['catt']}", "--question", QUESTION, "--dictionary",
                     built, "--format", "jsonl", "--out", out, "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    (record,) = [json.loads(line) for line in result.stdout.splitlines()]
    return {"file": built, "scene": scene, "out": out, "record": record}


def test_dictionary_option_swaps_the_entries(folders, swapped):
    """`--dictionary FILE`: the model's entries become the file's, the record is that model's explanation, its
    entries carry the file's counts and members, and its meta names the file (absolute path, sha256)."""
    import hashlib

    from PIL import Image

    from xattn_cli.dictionary import load_dictionary
    from xattn_cli.explainers import build_relevancy
    from xattn_cli.models.registry import load_model

    saved = load_dictionary(swapped["file"])
    adapter = load_model(f"hf:{folders['catt']}")
    assert adapter.dictionary is None and not torch.equal(adapter.model.causal.dictionary, saved.entries)
    image = Image.open(swapped["scene"])
    [[own]] = build_relevancy(adapter, method="chefer", questions=[QUESTION]).explain([image])
    explainer = build_relevancy(adapter, method="chefer", questions=[QUESTION], dictionary=swapped["file"])
    assert torch.equal(adapter.model.causal.dictionary, saved.entries)
    [[expected]] = explainer.explain([image])
    assert expected.score != pytest.approx(own.score, abs=1e-4)  # the swap changes this model's output

    record = swapped["record"]
    (target,) = record["targets"]
    assert target["score"] == pytest.approx(expected.score, abs=1e-5) and target["answer"] == expected.extra["answer"]
    assert [entry["entry"] for entry in target["dictionary"]] == [e["entry"] for e in expected.extra["dictionary"]]
    for entry in target["dictionary"]:
        assert entry["count"] == int(saved.counts[entry["entry"]])
        assert [m["region"] for m in entry["members"]] == saved.members[entry["entry"], :, 1].tolist()
    assert record["meta"]["dictionary"] == str(swapped["file"].resolve())
    assert record["meta"]["dictionary_sha256"] == hashlib.sha256(swapped["file"].read_bytes()).hexdigest()


def test_dictionary_option_refusals(folders, swapped, tmp_path):
    """A model without causal attention, a file of another K, unreadable and missing files: exit 2, one line."""
    from xattn_cli.dictionary import DictionaryFile, save_dictionary

    wrong_k = tmp_path / "five.safetensors"
    save_dictionary(wrong_k, DictionaryFile(torch.zeros(5, 16), torch.zeros(5, dtype=torch.long),
                                            torch.zeros(5, 1, 2, dtype=torch.long),
                                            torch.zeros(5, 1, 4, 4, 3, dtype=torch.uint8), ["x.png"]))
    text = tmp_path / "text.safetensors"
    text.write_text("not a dictionary")
    cases = [("shapes-lxmert", swapped["file"], "--dictionary is for models with causal attention (CATT); "
                                                "shapes-lxmert is not one"),
             (f"hf:{folders['base']}", swapped["file"], "has no causal attention: a dictionary does not apply"),
             (f"hf:{folders['catt']}", wrong_k, "holds (5, 16) entries, this model needs (6, 16)"),
             (f"hf:{folders['catt']}", text, "is not a readable dictionary file"),
             (f"hf:{folders['catt']}", tmp_path / "missing.safetensors", "dictionary file not found")]
    for model, dictionary, message in cases:
        result = _invoke("relevancy", swapped["scene"], "--model", model, "--question", QUESTION, "--dictionary",
                         dictionary, "--out", tmp_path / "run", "--device", "cpu", "--quiet")
        assert result.exit_code == 2, (model, result.output)
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert not (tmp_path / "run" / "results.jsonl").exists()


def _strips(page: str) -> dict[int, "np.ndarray"]:
    """Entry index → the pixels of the strip the page shows beside it (decoded from its embedded PNG)."""
    import base64
    import io
    import re

    import numpy as np
    from PIL import Image

    rules = dict(re.findall(r"\.(strip-\d+) \{ background-image: url\(data:image/png;base64,([^)]*)\)", page))
    shown = re.findall(r'class="strip (strip-\d+)" role="img" aria-label="entry (\d+) members"', page)
    return {int(entry): np.asarray(Image.open(io.BytesIO(base64.b64decode(rules[css])))) for css, entry in shown}


def test_report_shows_each_listed_entrys_member_crops(folders, swapped):
    """The report of the --dictionary run shows, beside each listed entry, a strip whose pixels are the
    file's crops of that entry's members, side by side."""
    from xattn_cli.dictionary import load_dictionary
    from xattn_cli.render.report import build_report

    saved = load_dictionary(swapped["file"])
    page = build_report(swapped["out"])
    (target,) = swapped["record"]["targets"]
    strips = _strips(page)
    assert sorted(strips) == sorted(entry["entry"] for entry in target["dictionary"])
    size = saved.crops.shape[2]
    for entry, pixels in strips.items():
        assert pixels.shape == (size, saved.crops.shape[1] * size, 3)
        for member in range(saved.crops.shape[1]):
            assert (pixels[:, member * size:(member + 1) * size] == saved.crops[entry, member].numpy()).all()
    assert f"#{target['dictionary'][0]['entry']} · " in page and f"{target['dictionary'][0]['count']} points" in page


def test_report_never_shows_another_dictionarys_crops(folders, swapped, tmp_path):
    """A dictionary file changed since the run shows why instead of crops; the run's own file put inside the
    results folder (a folder moved elsewhere) is found there by name; a run with no file shows entries only."""
    from xattn_cli.dictionary import load_dictionary, save_dictionary
    from xattn_cli.render.report import build_report

    used = tmp_path / "used.safetensors"
    shutil.copy(swapped["file"], used)
    out = tmp_path / "run"
    result = _invoke("relevancy", swapped["scene"], "--model", f"hf:{folders['catt']}", "--question", QUESTION,
                     "--dictionary", used, "--out", out, "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    changed = load_dictionary(used)
    changed.crops = 255 - changed.crops
    save_dictionary(used, changed)
    page = build_report(out)
    assert f"{used.resolve()} changed since the run" in page and not _strips(page)
    shutil.copy(swapped["file"], out / "used.safetensors")
    assert len(_strips(build_report(out))) == 5

    plain = tmp_path / "plain"
    result = _invoke("relevancy", swapped["scene"], "--model", f"hf:{folders['catt']}", "--question", QUESTION,
                     "--out", plain, "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    page = build_report(plain)
    assert "no crops: the run names no dictionary file" in page and not _strips(page)
