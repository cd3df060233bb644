"""`xattn merge`: join the --out folders of shard runs into one.

Usage:
    xattn surgery imgs/ --text dog --shard 0/2 --out runs/0 & xattn surgery imgs/ --text dog --shard 1/2 --out runs/1
    xattn merge runs/0 runs/1 --out runs/all
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from xattn_cli.cli._run import fail


def merge(
    out_dirs: Annotated[list[Path], typer.Argument(metavar="OUT_DIRS...", help="--out folders of runs (e.g. the shards of one run).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="New folder for the merged results.jsonl and files.", show_default=False)],
) -> None:
    """Merge the results of several runs; an image with different results in two of them is an error."""
    from xattn_cli.errors import UsageError
    from xattn_cli.io.merge import merge_outputs

    try:
        summary = merge_outputs(out_dirs, out)
    except UsageError as error:
        raise fail(str(error)) from None
    typer.echo(f"xattn: merged {summary.records} record(s) ({summary.failed} failed) from {summary.folders} "
               f"folder(s) into {out}", err=True)
