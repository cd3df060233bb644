"""`xattn world`: the procedural shapes world as a dataset folder."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from xattn_cli.cli._run import fail

app = typer.Typer(help="The shapes world: seeded scenes with masks, boxes, captions and questions.",
                  no_args_is_help=True)


@app.command("export")
def export(
    folder: Annotated[Path, typer.Argument(help="Output folder (images/, masks/, annotations.jsonl).")],
    n: Annotated[int, typer.Option("--n", min=1, help="Number of scenes.")] = 100,
    seed: Annotated[int, typer.Option("--seed", help="Stream seed; scene i is the same for every n.")] = 0,
    size: Annotated[int, typer.Option("--size", min=16, max=2048, help="Image side in pixels.")] = 224,
    confounded: Annotated[bool, typer.Option("--confounded", help="Colour follows shape 90% of the time.")] = False,
    colour_rule: Annotated[str, typer.Option("--colour-rule", help="How colour follows shape: free (independent), biased:P (the shape's usual colour with probability P, else one of the other five) or anti (never the usual colour). Usual colours: circle red, square green, triangle blue, star yellow, cross purple, ring orange.")] = "free",
    style: Annotated[str, typer.Option("--style", help="Renderer: classic (the original world), varied (the training world: jittered proportions, colours, backgrounds, overlaps, outlines) or shifted (a different renderer for validation and model cards only, never training). Same vocabulary and ground truth in each.")] = "classic",
) -> None:
    """Write N scenes in the dataset folder format `xattn bench quality --data` reads."""
    from xattn_cli.errors import UsageError
    from xattn_cli.world.export import export_dataset
    from xattn_cli.world.shapes import ColourRule

    try:
        annotations = export_dataset(folder, n, seed, size, confounded, ColourRule.parse(colour_rule), style)
    except UsageError as error:
        raise fail(str(error)) from None
    typer.echo(str(annotations))
