"""`xattn bench`: measured faithfulness (`quality`) and speed (`perf`)."""
from __future__ import annotations

import typer

app = typer.Typer(help="Measure explanations: faithfulness against ground truth, and speed.",
                  no_args_is_help=True)
