"""`xattn report`: one self-contained HTML page for a folder of results and/or benchmark runs.

- A results folder (`results.jsonl` from `xattn surgery` / `xattn relevancy`) becomes a gallery: one row
  per image, model · method and target with the image, its overlay, the score and the text tokens'
  relevance (causal-attention models: also each listed dictionary entry with its member crops, from the
  dictionary file the records' meta names; see `render.dictionary`); an error record gets a row with its
  message. A folder that several runs wrote to (other models or methods) shows each run's latest record of
  each image; each picture is embedded once.
- Each `*.json` in the folder that `xattn bench quality --json` wrote becomes its tables and its plot.

Images are embedded as PNG data URIs (thumbnails), so the page references nothing outside itself and can
be mailed or archived alone. A small inline script sorts a table by the column header clicked.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Callable, Iterator

from PIL import Image

from xattn_cli.errors import ItemError, UsageError
from xattn_cli.render import METRIC_LABELS, escape, png_data_uri
from xattn_cli.render.dictionary import EntryStrips
from xattn_cli.io.images import load_image
from xattn_cli.io.outputs import RESULTS_FILE_NAME, artifact_in, atomic_write_bytes, latest_records

THUMBNAIL = 192  # longest side of an embedded image, in pixels
TARGET_KEYS = {"target", "score", "overlay", "map", "tokens", "degenerate", "peak"}  # shown in their own columns

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.8em 0 1.6em; }
th, td { border-bottom: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: middle; }
th[data-type] { cursor: pointer; user-select: none; }
th[data-order="descending"]::after { content: " \\25BC"; }
th[data-order="ascending"]::after { content: " \\25B2"; }
td.number { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.error { color: #a00; }
small, .meta { color: #666; }
img.thumb { width: 160px; height: auto; image-rendering: pixelated; }
span.thumb { display: block; width: 160px; background-position: center; background-size: contain;
             background-repeat: no-repeat; image-rendering: pixelated; }
img.plot { max-width: 100%; }
span.token { padding: 1px 3px; margin: 1px; border-radius: 3px; display: inline-block; }
span.strip { display: inline-block; height: 32px; margin: 1px 0; vertical-align: middle; background-size: contain;
             background-repeat: no-repeat; image-rendering: pixelated; }
td.entries { white-space: nowrap; }
"""

SORT_SCRIPT = """
document.querySelectorAll("th[data-type]").forEach((header) => {
  header.addEventListener("click", () => {
    const table = header.closest("table");
    const column = Array.from(header.parentNode.children).indexOf(header);
    const descending = header.dataset.order !== "descending";
    table.querySelectorAll("th").forEach((th) => delete th.dataset.order);
    header.dataset.order = descending ? "descending" : "ascending";
    const key = (row) => {
      const cell = row.cells[column];
      const value = cell.dataset.value ?? cell.textContent.trim();
      if (header.dataset.type !== "number") return value.toLowerCase();
      const number = parseFloat(value);
      return Number.isNaN(number) ? -Infinity : number;
    };
    const body = table.tBodies[0];
    const rows = Array.from(body.rows);
    rows.sort((a, b) => (key(a) < key(b) ? -1 : key(a) > key(b) ? 1 : 0) * (descending ? -1 : 1));
    rows.forEach((row) => body.appendChild(row));
  });
});
"""


def write_report(folder: str | Path, out: str | Path | None = None) -> Path:
    """Write the page (default `<folder>/report.html`) and return its path."""
    page = build_report(folder)
    path = Path(out) if out is not None else Path(folder) / "report.html"
    atomic_write_bytes(path, page.encode("utf-8"))
    return path


def build_report(folder: str | Path) -> str:
    """The HTML page of a folder. Raises UsageError when the folder is missing or holds nothing to show."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"{folder}: no such folder")
    sections = [_laid_out(path, lambda path=path, run=run: _bench_section(path, run))
                for path, run in _bench_runs(folder)]
    results = folder / RESULTS_FILE_NAME
    if results.is_file():
        sections.append(_laid_out(results, lambda: _gallery(folder, latest_per_run(results))))
    if not sections:
        raise UsageError(f"{folder}: nothing to report (no {RESULTS_FILE_NAME}, no `xattn bench quality --json` file)")
    title = f"xattn report: {folder.resolve().name}"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f'<link rel="icon" href="data:,"><style>{STYLE}</style></head>\n<body><h1>{escape(title)}</h1>\n'
            + "\n".join(sections) + f"\n<script>{SORT_SCRIPT}</script></body></html>\n")


def _laid_out(path: Path, render: Callable[[], str]) -> str:
    """`render()`, with a file whose records lack what the page reads (hand-edited, another version) named
    in a usage error."""
    try:
        return render()
    except (KeyError, TypeError, ValueError) as error:
        raise UsageError(f"{path}: not laid out as xattn writes it ({type(error).__name__}: {error})") from None


# --- benchmark runs ---------------------------------------------------------------------------------
def _bench_runs(folder: Path) -> Iterator[tuple[Path, dict]]:
    for path in sorted(folder.glob("*.json")):
        try:
            run = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(run, dict) and run.get("benchmark") == "quality":
            yield path, run


def _bench_section(path: Path, run: dict) -> str:
    from xattn_cli.render.plots import quality_figure

    columns = [("model", "text"), ("method", "text"), ("targets", "number")]
    columns += [(label, "number") for label in METRIC_LABELS.values()]
    rows = []
    for row in run["rows"]:
        cells = [_cell(row["model"]), _cell(row["method"]), _number(row["targets"], str(row["targets"]))]
        for metric in METRIC_LABELS:
            interval = row[metric]
            cells.append(_number(interval["mean"], f"{interval['mean']:.3f} <small>[{interval['low']:.3f}, "
                                                   f"{interval['high']:.3f}]</small>"))
        rows.append(cells)
    meta = (f"data: {run['data']}; {run['scenes']} scenes; perturbation steps {run['steps']}; "
            f"{run['resamples']} bootstrap resamples ({run['confidence']:.0%} intervals); {run['elapsed_s']} s")
    parts = [f"<section><h2>Faithfulness benchmark: {escape(path.name)}</h2>", f'<p class="meta">{escape(meta)}</p>',
             _table(columns, rows)]
    if run.get("sanity"):
        sanity = run["sanity"]
        parts.append(f"<h3>Sanity: maps after randomising the top 1, 2, … blocks</h3><p class=\"meta\">Spearman ρ"
                     f" with the trained model's maps on {sanity['scenes']} scenes; flagged when ρ ≥ "
                     f"{sanity['flag_at']} with every block random.</p>")
        sanity_rows = [[_cell(row["model"]), _cell(row["method"]),
                        _number(row["spearman"][-1], ", ".join(f"{value:.2f}" for value in row["spearman"])),
                        _cell("FLAGGED" if row["flagged"] else "ok", "error" if row["flagged"] else "")]
                       for row in sanity["rows"]]
        parts.append(_table([("model", "text"), ("method", "text"), ("ρ by blocks randomised", "number"),
                             ("flag", "text")], sanity_rows))
    parts.append(f'<img class="plot" alt="metrics of {escape(path.name)}" src="{png_data_uri(quality_figure(run))}">')
    return "\n".join(parts) + "</section>"


# --- results gallery --------------------------------------------------------------------------------
def latest_per_run(results: Path) -> list[dict[str, Any]]:
    """The last record of each (image, model, method), in first-seen order: a resumed or retried image keeps
    its latest record, and runs of other models or methods into the same folder keep theirs."""
    return list(latest_records(results).values())


def _gallery(folder: Path, records: list[dict[str, Any]]) -> str:
    thumbnails: dict[Path, str] = {}
    pictures: dict[Path, tuple[str, str]] = {}  # original image → (CSS class, its one embedded thumbnail rule)

    def thumbnail(path: Path | None, alt: str) -> str:
        if path is None:
            return _cell(f"<small>{escape(alt)} not found</small>", raw=True)
        if path not in thumbnails:
            thumbnails[path] = _thumbnail(path)[0]
        return _cell(f'<img class="thumb" alt="{escape(alt)}" src="{thumbnails[path]}">' if thumbnails[path]
                     else f"<small>{escape(alt)} unreadable</small>", raw=True)

    def picture(path: Path | None) -> str:
        """The original image: embedded once in a style rule, however many rows show it."""
        if path is None:
            return _cell("<small>image not found</small>", raw=True)
        if path not in pictures:
            uri, size = _thumbnail(path)
            css = f"picture-{len(pictures)}"
            pictures[path] = (css, f".{css} {{ background-image: url({uri}); aspect-ratio: {size[0]} / {size[1]}; }}"
                              if uri else "")
        css, rule = pictures[path]
        return _cell(f'<span class="thumb {css}" role="img" aria-label="image"></span>' if rule
                     else "<small>image unreadable</small>", raw=True)

    columns = [("image", "text"), ("picture", ""), ("model · method", "text"), ("target", "text"),
               ("score", "number"), ("overlay", ""), ("tokens", ""), ("details", "text")]
    strips = EntryStrips(folder)  # causal-attention targets' dictionary entries, in a column of their own
    with_entries = any(isinstance(target.get("dictionary"), list)
                       for record in records for target in record.get("targets") or [])
    if with_entries:
        columns.append(("dictionary entries: #, relevance, size, member crops", ""))
    rows, failed = [], 0
    for record in records:
        name = str(record["image"])
        source = picture(_find(folder, name))
        model = _cell(f"{record.get('model', '')} · {record.get('method', '')}")
        if record.get("status") != "ok":
            failed += 1
            error = record.get("error") or {}
            rows.append([_cell(name), source, model, _cell(""), _number(None, ""), _cell(""), _cell(""),
                         _cell(f"error: {error.get('type', '')}: {error.get('message', '')}", "error")]
                        + ([_cell("")] if with_entries else []))
            continue
        for target in record.get("targets") or []:
            overlay = artifact_in(folder, record, target["overlay"]) if target.get("overlay") else None
            details = "; ".join(f"{key}: {value}" for key, value in target.items()
                                if key not in TARGET_KEYS and not isinstance(value, (list, dict)))
            rows.append([_cell(name), source, model, _cell(str(target["target"])),
                         _number(target["score"], f"{target['score']:.4f}"),
                         thumbnail(overlay if overlay and overlay.is_file() else None, "overlay") if overlay
                         else _cell("<small>no overlay written</small>", raw=True),
                         _cell(_tokens(target.get("tokens") or []), raw=True), _cell(details)]
                        + ([_cell(strips.cell(record, target.get("dictionary") or []), "entries", raw=True)] if with_entries
                           else []))
    images = len({record["image"] for record in records})
    runs = len({(record.get("model"), record.get("method")) for record in records})
    summary = (f"{len(records)} records of {images} images by {runs} model · method run(s), {failed} failed; "
               "click a column header to sort")
    styles = "\n".join([*(rule for _, rule in pictures.values() if rule), strips.styles()])
    return (f"<section><h2>Results: {escape(folder.name)}</h2><style>{styles}</style>"
            f"<p class=\"meta\">{escape(summary)}</p>" + _table(columns, rows) + "</section>")


def _find(folder: Path, recorded: str) -> Path | None:
    """The image a record names: as recorded (relative to the run's working directory), else inside the folder."""
    for candidate in (Path(recorded), folder / recorded):
        if candidate.is_file():
            return candidate
    return None


def _tokens(tokens: list[dict[str, Any]]) -> str:
    """Text tokens shaded by relevance (the largest fully)."""
    top = max((float(t["relevance"]) for t in tokens), default=0.0)
    spans = []
    for token in tokens:
        strength = float(token["relevance"]) / top if top > 0 else 0.0
        spans.append(f'<span class="token" title="{float(token["relevance"]):.4f}" '
                     f'style="background: rgba(230, 80, 40, {strength:.2f})">{escape(str(token["token"]))}</span>')
    return "".join(spans)


# --- HTML pieces ----------------------------------------------------------------------------------
def _cell(content: str, css: str = "", raw: bool = False) -> str:
    body = content if raw else escape(content)
    return f'<td class="{css}">{body}</td>' if css else f"<td>{body}</td>"


def _number(value: float | int | None, shown: str) -> str:
    """A numeric cell: `shown` (HTML) on the page, `value` for sorting."""
    sort_value = "" if value is None else repr(float(value))
    return f'<td class="number" data-value="{sort_value}">{shown}</td>'


def _table(columns: list[tuple[str, str]], rows: list[list[str]]) -> str:
    """`columns`: (label, "text" | "number" | "" for not sortable); `rows`: rendered cells."""
    head = "".join(f'<th data-type="{kind}">{escape(label)}</th>' if kind else f"<th>{escape(label)}</th>"
                   for label, kind in columns)
    body = "\n".join(f"<tr>{''.join(cells)}</tr>" for cells in rows)
    return f'<table class="sortable"><thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody></table>'


def _thumbnail(path: Path) -> tuple[str, tuple[int, int]]:
    """A PNG data URI of the image, its longest side at most THUMBNAIL pixels, and its (W, H); ('', (0, 0))
    when it cannot be read."""
    try:
        image = load_image(path)
    except ItemError:
        return "", (0, 0)
    image.thumbnail((THUMBNAIL, THUMBNAIL), Image.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return png_data_uri(buffer.getvalue()), image.size
