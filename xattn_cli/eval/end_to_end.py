"""`xattn bench perf --end-to-end`: a folder to results, against the method alone, in one run.

The method row times `explainer.explain` over images already decoded in memory, in batches (as
`bench perf` does). Each CLI row times what `xattn surgery|relevancy FOLDER` runs after loading the model:
`BatchRunner.run` over the same scenes saved as PNG files (decoding workers → model → writer pool →
files → manifest), into a fresh folder, with the same explainer (its text cache warm, as within one run).
Rows run back to back, so the ratios compare like with like; the process start-up (imports, model load)
is not in either and is reported by `bench perf` itself.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

from xattn_cli.eval.perf import Measurement, format_header, measure, perf_images
from xattn_cli.explainers.base import Explainer
from xattn_cli.io.outputs import RESULTS_FILE_NAME, read_records
from xattn_cli.runner import BatchRunner

OUTPUT_ROWS = (("none", False), ("none", True), ("png", False))
"""(--overlays, --save-maps) of each CLI row: scores only, scores and maps, PNG overlays."""


def cli_row_name(overlays: str, save_maps: bool) -> str:
    return f"CLI over a folder, --overlays {overlays}" + (" --save-maps" if save_maps else "")


def run_end_to_end(explainer: Explainer, *, scenes: int, batch_size: int, device: str,
                   progress: Callable[[str], None] = lambda line: None) -> dict:
    """The method row and one CLI row per OUTPUT_ROWS entry over `scenes` 224 px scenes; ratios to the method."""
    images = perf_images(scenes)
    batches = [images[start:start + batch_size] for start in range(0, scenes, batch_size)]
    with tempfile.TemporaryDirectory(prefix="xattn-e2e-") as folder:
        paths = _saved(images, Path(folder) / "scenes")
        progress(f"measuring {explainer.method} over {scenes} decoded scenes")
        method_row = measure(explainer.method, lambda: [explainer.explain(batch) for batch in batches], scenes,
                             device)
        rows: list[Measurement] = [method_row]
        for index, (overlays, save_maps) in enumerate(OUTPUT_ROWS):
            name = cli_row_name(overlays, save_maps)
            progress(f"measuring {name}")
            out = Path(folder) / f"out-{index}"
            runner = BatchRunner(explainer, out, device=device, save_maps=save_maps, batch_size=batch_size,
                                 overlays=overlays)
            rows.append(_timed_run(name, runner, paths))
            _check_complete(out, scenes)
    return {
        "scenes": scenes,
        "rows": [{"name": row.name, "items": row.items, "seconds": row.seconds, "items_per_s": row.items_per_s}
                 for row in rows],
        "cli_vs_method": {row.name: row.items_per_s / method_row.items_per_s for row in rows[1:]},
    }


def _saved(images: Sequence, folder: Path) -> list[str]:
    folder.mkdir(parents=True)
    paths = [str(folder / f"scene-{index:05d}.png") for index in range(len(images))]
    for image, path in zip(images, paths):
        image.save(path)
    return paths


def _timed_run(name: str, runner: BatchRunner, paths: list[str]) -> Measurement:
    started = time.perf_counter()
    runner.run(paths)
    return Measurement(name, len(paths), time.perf_counter() - started, peak_mb=0.0)


def _check_complete(out: Path, scenes: int) -> None:
    """A row that lost or failed images measured something else: refuse to report it."""
    records = list(read_records(out / RESULTS_FILE_NAME))
    ok = sum(record["status"] == "ok" for record in records)
    if ok != scenes:
        raise RuntimeError(f"the end-to-end run wrote {ok} ok records for {scenes} scenes")


def format_end_to_end(result: dict) -> str:
    """A plain-text table: items/s of each row and the CLI rows' ratio to the method."""
    lines = [format_header(result) + f" · {result['scenes']} scenes",
             f"{'':48} {'items/s':>9} {'seconds':>8} {'× method':>9}"]
    for row in result["rows"]:
        ratio = result["cli_vs_method"].get(row["name"])
        lines.append(f"{row['name']:48} {row['items_per_s']:9.2f} {row['seconds']:8.2f} "
                     + (f"{ratio:9.2f}" if ratio is not None else f"{'':9}"))
    return "\n".join(lines)
