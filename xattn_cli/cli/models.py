"""`xattn models`: the registry — names, families, methods, and whether weights are here."""
from __future__ import annotations

import json
from pathlib import Path

import typer

from xattn_cli.cli import _options as opt
from xattn_cli.cli._run import resolve_format


def models(output_format: opt.FormatOpt = None) -> None:
    """List the models xattn knows: bundled ones, public aliases and name prefixes."""
    from xattn_cli.models.registry import list_models

    rows = [{"name": spec.display_name,
             "family": spec.family, "methods": list(spec.methods), "bundled": spec.bundled,
             "weights": _weights_here(spec), "description": spec.description} for spec in list_models()]
    output_format = resolve_format(output_format)
    if output_format is opt.OutputFormat.table:
        from rich.console import Console
        from rich.table import Table

        table = Table("name", "family", "methods", "weights", "description")
        for row in rows:
            table.add_row(row["name"], row["family"], ", ".join(row["methods"]), row["weights"], row["description"])
        Console().print(table)
    elif output_format is opt.OutputFormat.json:
        typer.echo(json.dumps(rows, indent=2))
    else:
        for row in rows:
            typer.echo(json.dumps(row))


def _weights_here(spec) -> str:
    """Whether this machine holds the weights: bundled, in the Hugging Face cache (what an offline run reads),
    or not here (the first run downloads them; `--pretrained` names a local file or folder instead)."""
    if spec.bundled:
        return "bundled" if spec.weights_available() else "missing (reinstall xattn)"
    if spec.prefix:
        return "named by the argument or --pretrained"
    from huggingface_hub import constants

    from xattn_cli.config import load_config

    config = load_config(spec.name)
    repo = config.get("hub_cache") or config["source"].removeprefix("hf:")
    snapshots = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / "snapshots"
    if snapshots.is_dir() and any(snapshots.iterdir()):
        return "in the Hugging Face cache"
    return "not here (downloads on first use)"
