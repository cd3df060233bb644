"""`xattn bench perf`: every row measured, ratios that follow from the rows, JSON written, usage errors."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from xattn_cli.cli.app import app
from xattn_cli.eval.perf import Measurement, measure, perf_texts

runner = CliRunner()


def test_clip_relevancy_rows_and_ratios(tmp_path):
    report = tmp_path / "perf.json"
    result = runner.invoke(app, ["bench", "perf", "--method", "chefer", "--batch-size", "2", "--texts", "2",
                                 "--loop-items", "1", "--device", "cpu", "--json", str(report), "-q"])
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    names = [row["name"] for row in data["rows"]]
    assert names == ["bare forward+backward", "chefer", "batch-1 fp32 loop", "bare, the method's own backward"]
    assert [row["items"] for row in data["rows"]] == [2, 2, 1, 2]  # batch × repeats; the loop: --loop-items
    assert all(row["seconds"] > 0 and row["peak_mb"] >= 0 for row in data["rows"])
    speed = {row["name"]: row["items"] / row["seconds"] for row in data["rows"]}
    assert data["method_vs_bare"] == pytest.approx(speed["chefer"] / speed["bare forward+backward"])
    assert data["method_vs_own_backward"] == pytest.approx(speed["chefer"] / speed["bare, the method's own backward"])
    assert data["texts"] == 2 and data["batch_size"] == 2 and data["startup"]["ratio"] > 0
    assert "chefer vs bare" in result.stdout


def test_classifier_relevancy_has_its_own_backward_row():
    result = runner.invoke(app, ["bench", "perf", "--model", "shapes-vit", "--batch-size", "2", "--loop-items", "1",
                                 "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    assert "bare, the method's own backward" in result.stdout and "nothing recorded" in result.stdout


def test_surgery_rows_include_both_official_loops(tmp_path):
    result = runner.invoke(app, ["bench", "perf", "--batch-size", "2", "--texts", "2", "--loop-items", "1",
                                 "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    for name in ("bare image encoder", "surgery", "batch-1 fp32 loop, text cached", "batch-1 fp32 loop, text re-encoded"):
        assert name in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--model", "shapes-vit", "--method", "surgery"], "has no surgery"),
    (["--method", "gradcam++"], "unknown method"),
    (["--texts", "99"], "number of texts must be in 1.."),
    (["--model", "no-such-model"], "unknown model"),
])
def test_usage_errors(args, message):
    result = runner.invoke(app, ["bench", "perf", "--device", "cpu", "-q", *args])
    assert result.exit_code == 2 and message in result.output


def test_measure_counts_items_and_repeats():
    calls = []
    row = measure("x", lambda: calls.append(1), items=3, device="cpu", repeats=2)
    assert len(calls) == 3 and row.items == 6 and row.items_per_s == pytest.approx(6 / row.seconds)
    assert isinstance(row, Measurement) and row.peak_mb >= 0
    assert len(set(perf_texts(20))) == 20
