"""The root `xattn` app. Command modules import torch only inside their functions."""
from __future__ import annotations

import os
import sys
import warnings
from typing import Annotated, Optional

import typer

from xattn_cli import __version__
from xattn_cli.cli import bench as bench_cli
from xattn_cli.cli import dictionary as dictionary_cli
from xattn_cli.cli import mask as mask_cli
from xattn_cli.cli import merge as merge_cli
from xattn_cli.cli import models as models_cli
from xattn_cli.cli import relevancy as relevancy_cli
from xattn_cli.cli import report as report_cli
from xattn_cli.cli import surgery as surgery_cli
from xattn_cli.cli import world as world_cli

app = typer.Typer(
    name="xattn",
    help="Explain attention models: CLIP Surgery maps, relevancy propagation, token masks.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"xattn {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
) -> None:
    """Explain attention models: CLIP Surgery maps, relevancy propagation, token masks."""


app.command("surgery")(surgery_cli.surgery)
app.command("relevancy")(relevancy_cli.relevancy)
app.command("mask")(mask_cli.mask)
app.command("models")(models_cli.models)
app.command("report")(report_cli.report)
app.command("merge")(merge_cli.merge)
app.add_typer(world_cli.app, name="world")
app.add_typer(bench_cli.app, name="bench")
app.add_typer(dictionary_cli.app, name="dictionary")


def main() -> None:
    """Console entry point: usage and unexpected errors are one line (XATTN_DEBUG=1 shows tracebacks)."""
    click_exception, abort = _click_errors()
    warnings.formatwarning = _warning_line
    try:
        code = app(standalone_mode=False)
    except click_exception as error:
        if type(error).__name__ == "NoArgsIsHelpError":
            error.show()  # the help text, as with --help
        else:
            message = " ".join(error.format_message().split())
            typer.echo(f"xattn: error: {message} (see --help)", err=True)
        sys.exit(error.exit_code)
    except (KeyboardInterrupt, abort):
        typer.echo("xattn: interrupted", err=True)
        sys.exit(130)
    except Exception as error:  # a bug, not a user error: keep stderr to one line unless debugging
        if os.environ.get("XATTN_DEBUG"):
            raise
        typer.echo(f"xattn: internal error: {type(error).__name__}: {error}".splitlines()[0], err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


def _click_errors() -> tuple[type[Exception], type[BaseException]]:
    """(ClickException, Abort) of the click typer runs on: typer ≥ 0.16 vendors click, and later versions
    keep `Abort` in `typer.exceptions` instead."""
    import typer.exceptions

    try:
        from typer._click import exceptions as click_errors
    except ImportError:
        from click import exceptions as click_errors
    abort = getattr(click_errors, "Abort", None) or getattr(typer.exceptions, "Abort", KeyboardInterrupt)
    return click_errors.ClickException, abort


def _warning_line(message: Warning | str, category: type[Warning], *location: object) -> str:
    """Warnings as one stderr line each, like xattn's other notes."""
    text = str(message).strip().splitlines()
    return f"xattn: warning: {text[0] if text else category.__name__}\n"
