"""`xattn world`: the procedural shapes world as a dataset folder."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="The shapes world: seeded scenes with masks, boxes, captions and questions.",
                  no_args_is_help=True)


@app.command("export")
def export(
    folder: Annotated[Path, typer.Argument(help="Output folder (images/, masks/, annotations.jsonl).")],
    n: Annotated[int, typer.Option("--n", min=1, help="Number of scenes.")] = 100,
    seed: Annotated[int, typer.Option("--seed", help="Stream seed; scene i is the same for every n.")] = 0,
    size: Annotated[int, typer.Option("--size", min=16, max=2048, help="Image side in pixels.")] = 224,
    confounded: Annotated[bool, typer.Option("--confounded", help="Colour follows shape 90% of the time.")] = False,
) -> None:
    """Write N scenes in the dataset folder format `xattn bench quality --data` reads."""
    from xattn_cli.world.export import export_dataset

    annotations = export_dataset(folder, n, seed, size, confounded)
    typer.echo(str(annotations))
