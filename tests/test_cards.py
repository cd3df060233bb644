"""Model cards take their figures from the benchmark JSON: each committed card equals what
`benchmarks/cards.py` renders from the committed JSON (after a benchmark rerun: `python benchmarks/cards.py`)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from helpers import load_benchmark

ROOT = Path(__file__).resolve().parent.parent
cards = load_benchmark("cards")


@pytest.mark.parametrize("card", sorted(cards.CARDS))
def test_committed_card_equals_its_rendering_from_the_json(card):
    text = (ROOT / card).read_text()
    assert cards.render(card, text) == text, f"{card} differs from its benchmark JSON: run python benchmarks/cards.py"


def test_a_changed_figure_reaches_the_card(tmp_path):
    card = "assets/models/shapes-detr/README.md"
    shutil.copy(ROOT / "benchmarks" / "shapes_multimodal.json", tmp_path)
    shutil.copy(ROOT / "benchmarks" / "shifted.json", tmp_path)
    figures = json.loads((tmp_path / "shapes_multimodal.json").read_text())
    text = (ROOT / card).read_text()

    def rendered_with(map50: float, raw_above_chefer: float) -> str:
        changed = {**figures, "shapes-detr map50": map50,
                   "shapes-detr pointing raw": figures["shapes-detr pointing chefer"] + raw_above_chefer}
        (tmp_path / "shapes_multimodal.json").write_text(json.dumps(changed))
        return cards.render(card, text, benchmarks=tmp_path)

    held = rendered_with(0.95, -0.01)
    assert "| **0.950** (target ≥ 0.70) |" in held and "(Chefer ≥ raw" not in held
    rendered = rendered_with(0.5, 0.01)  # below the 0.70 target, raw above Chefer
    assert "| **0.500** (target ≥ 0.70: **not met**) |" in rendered
    assert "(Chefer ≥ raw: **not met**) |" in rendered
    assert rendered.split("<!-- figures:figures -->")[0] == text.split("<!-- figures:figures -->")[0]  # prose kept


def test_a_card_without_its_markers_is_refused():
    card = "assets/models/shapes-detr/README.md"
    text = (ROOT / card).read_text().replace("<!-- /figures:figures -->", "")
    with pytest.raises(ValueError, match="marked tables"):
        cards.render(card, text)


def test_a_shifted_figure_below_its_bar_or_below_a_baseline_is_marked(tmp_path):
    card = "assets/models/shapes-lxmert/README.md"
    result = json.loads((ROOT / "benchmarks" / "shifted.json").read_text())
    figures = result["models"]["shapes-lxmert"]
    figures["accuracy"] = {"mean": 0.95, "low": 0.93, "high": 0.97, "n": 10}
    figures["pointing_chefer"] = {"mean": 0.85, "low": 0.8, "high": 0.9, "n": 10}
    figures["pointing_raw"] = {"mean": 0.2, "low": 0.1, "high": 0.3, "n": 10}
    figures["pointing_attn-gradcam"] = {"mean": 0.3, "low": 0.2, "high": 0.4, "n": 10}
    (tmp_path / "shifted.json").write_text(json.dumps(result))
    shutil.copy(ROOT / "benchmarks" / "shapes_multimodal.json", tmp_path)
    rendered = cards.render(card, (ROOT / card).read_text(), benchmarks=tmp_path)
    assert "| answer accuracy, every question | **0.950 [0.930, 0.970]** (target ≥ 0.90) |" in rendered
    assert "| pointing, Chefer relevancy (peak in the asked object) | **0.850 [0.800, 0.900]** (target ≥ 0.80) |" in rendered
    assert "| pointing, raw attention | 0.200 [0.100, 0.300] (≥ pointing, attention Grad-CAM: **not met**) |" in rendered


def test_clip_sweep_is_a_size_by_blocks_grid_with_the_best_cell_bold():
    figures = {"validation_pointing_size64_blocks1": 0.2, "validation_pointing_size64_blocks2": 0.5,
               "validation_pointing_size96_blocks1": 0.3, "validation_pointing_size96_blocks2": 0.4,
               "zero_shot_plain": 0.9}
    assert cards.clip_sweep(figures).splitlines() == [
        "| input size | 1 block | 2 blocks |", "| --- | --- | --- |", "| 64 | 0.200 | **0.500** |",
        "| 96 | 0.300 | 0.400 |"]
