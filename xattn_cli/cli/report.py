"""`xattn report`: a self-contained HTML page of a results folder and/or benchmark runs.

Usage:
    xattn relevancy imgs/ --out runs/a && xattn report runs/a         # gallery: overlays, scores, tokens
    xattn bench quality --json runs/q/quality.json && xattn report runs/q   # tables and plots
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def report(
    folder: Annotated[Path, typer.Argument(help="A results folder (results.jsonl) and/or a folder of `bench quality --json` files.", show_default=False)],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="The HTML file [default: FOLDER/report.html].", show_default=False)] = None,
) -> None:
    """Write one self-contained HTML page (images embedded, tables sortable) and print its path."""
    from xattn_cli.cli._run import EXIT_ITEMS_FAILED, fail
    from xattn_cli.errors import UsageError
    from xattn_cli.render.report import write_report

    try:
        path = write_report(folder, out)
    except UsageError as error:
        raise fail(str(error)) from None
    except OSError as error:
        raise fail(f"cannot write {error.filename}: {error.strerror or error}", EXIT_ITEMS_FAILED) from None
    typer.echo(str(path))
