"""`xattn dictionary`: the global dictionary a causal-attention (CATT) model's cross-sample attention reads."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from xattn_cli.cli._options import DeviceOpt
from xattn_cli.cli._run import EXIT_ITEMS_FAILED, fail

app = typer.Typer(help="Dictionaries of causal-attention (CATT) models: k-means over the region tokens their "
                  "cross-sample attention reads.", no_args_is_help=True)


@app.command("build")
def build(
    folder: Annotated[Path, typer.Argument(help="Images: a folder searched recursively, or a dataset folder (`xattn world export`), whose images/ is used.")],
    model: Annotated[str, typer.Option("--model", "-m", help="A model with causal attention: a name, or hf:DIR for a CATT model folder.")],
    out: Annotated[Path, typer.Option("--out", help="The dictionary file to write (.safetensors, format xattn-dictionary/1).")],
    k: Annotated[int, typer.Option("--k", min=1, help="Dictionary entries (k-means clusters).")] = 64,
    seed: Annotated[int, typer.Option("--seed", help="k-means++ seeding and the --max-points subset.")] = 0,
    iters: Annotated[int, typer.Option("--iters", min=1, help="Most Lloyd steps.")] = 100,
    members: Annotated[int, typer.Option("--members", min=1, help="Nearest real regions kept per entry, with crops.")] = 3,
    max_points: Annotated[int, typer.Option("--max-points", min=1, help="Cluster a seeded random subset of at most this many region tokens.")] = 200_000,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")] = 32,
    device: DeviceOpt = "auto",
) -> None:
    """Build a model's dictionary from FOLDER's images: one JSON line per unreadable image (skipped), then
    one summary line. Exit 0, 1 when some images failed, 2 on a usage error (no images, k too large, a model
    without causal attention)."""
    from xattn_cli.device import resolve_device
    from xattn_cli.dictionary import build_dictionary, gather_tokens, save_dictionary
    from xattn_cli.errors import UsageError
    from xattn_cli.io.inputs import expand_inputs
    from xattn_cli.models.registry import load_model

    root = folder / "images" if (folder / "images").is_dir() else folder
    if not root.is_dir():
        raise fail(f"{folder} is not a folder")
    try:
        paths = expand_inputs([str(root)])
    except ValueError:
        paths = []
    if not paths:
        raise fail(f"no images in {root}")
    failed = []

    def report(path: str, error: BaseException) -> None:
        failed.append(path)
        detail = error.to_record() if hasattr(error, "to_record") else {"type": type(error).__name__, "message": str(error)}
        typer.echo(json.dumps({"image": path, "status": "error", "error": detail}, ensure_ascii=False))

    try:
        adapter = load_model(model, device=resolve_device(device))
        if not hasattr(adapter, "dictionary_features"):
            raise UsageError(f"{model} has no causal attention: it reads no dictionary")
        names = [str(Path(path).relative_to(root)) for path in paths]
        tokens = gather_tokens(adapter.dictionary_features, paths, names, batch_size=batch_size, on_error=report)
        dictionary = build_dictionary(tokens, k, seed=seed, iters=iters, members=members, max_points=max_points,
                                      info={"model": model, "feature": "causal attention queries (region tokens)"})
        save_dictionary(out, dictionary)
    except UsageError as error:
        raise fail(str(error)) from None
    except OSError as error:
        raise fail(f"cannot write {out}: {error.strerror or error}", EXIT_ITEMS_FAILED) from None
    summary = {"status": "ok", "out": str(out), "model": model, "k": k, "images": len(tokens.names),
               "failed": len(failed), "points": int(dictionary.info["points"]),
               "inertia": float(dictionary.info["inertia"])}
    typer.echo(json.dumps(summary))
    if failed:
        typer.echo(f"xattn: {len(failed)} of {len(paths)} image(s) failed; see their error lines", err=True)
        raise typer.Exit(EXIT_ITEMS_FAILED)
