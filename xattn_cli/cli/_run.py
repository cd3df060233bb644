"""Running a map command: inputs → BatchRunner → stdout, with the exit codes of DESIGN §4."""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any, Callable

import typer

from xattn_cli.cli._options import Layout, OutputFormat, Overlays

EXIT_OK, EXIT_ITEMS_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
ALL_GPUS = "cuda:all"


def fail(message: str, code: int = EXIT_USAGE) -> typer.Exit:
    """Print one line on stderr; return the Exit to raise."""
    typer.echo(f"xattn: error: {message}", err=True)
    return typer.Exit(code)


def load_adapter(model: str, pretrained: str | None, device: str, trust_checkpoint: bool, labels: Path | None = None):
    """The model a map command explains, with `--labels` applied when given."""
    from xattn_cli.models.registry import load_model

    adapter = load_model(model, pretrained, device, trust_checkpoint=trust_checkpoint)
    if labels is not None:
        from xattn_cli.models.labels import apply_labels

        apply_labels(adapter, labels)
    return adapter


def require_not_empty(**options: list[str] | None) -> None:
    """Exit 2 with one line for an option given an empty string (`--text ""`), before any model loads."""
    for name, values in options.items():
        if values and any(not value.strip() for value in values):
            raise fail(f"--{name} must not be empty")


def resolve_format(requested: OutputFormat | None) -> OutputFormat:
    if requested is not None:
        return requested
    return OutputFormat.table if sys.stdout.isatty() else OutputFormat.jsonl


def run_map_command(images: list[str], build_explainer: Callable[[str], Any], *, out: Path, save_maps: bool,
                    output_format: OutputFormat | None, device: str, batch_size: int, resume: bool,
                    max_pixels: int, quiet: bool, workers: int | None = None, overlays: Overlays = Overlays.png,
                    shard: str | None = None, made_by: tuple[str, str] | None = None,
                    threads: int | None = None, layout: Layout = Layout.flat) -> None:
    """Expand inputs, keep this shard's, build the explainer (usage errors → exit 2), run, print, exit 0/1/130.
    `made_by` (model name as given, method) lets `--resume` skip loading the model when it has nothing to do."""
    from xattn_cli.errors import UsageError
    from xattn_cli.fanout import worker_part
    from xattn_cli.io.inputs import expand_inputs
    from xattn_cli.io.shards import in_shard, parse_shard

    output_format = resolve_format(output_format)
    stdin_text = sys.stdin.read() if "-" in images else None  # read once: `cuda:all` hands it to every worker
    try:
        inputs = expand_inputs(images, io.StringIO(stdin_text or ""))
        paths = inputs if shard is None else in_shard(inputs, *parse_shard(shard))
    except (ValueError, UsageError) as error:
        raise fail(str(error)) from None
    part = worker_part()
    if part is not None:  # worker i of n of a `--device cuda:all` run: every n-th input from the i-th
        paths = paths[part[0]::part[1]]
    if device == ALL_GPUS and paths:
        raise typer.Exit(_run_on_every_gpu(stdin_text, output_format))
    if not paths:  # a shard of few inputs can be empty: no model is loaded, and an empty manifest is left
        from xattn_cli.io.outputs import ResultsLog

        ResultsLog(out).close()
        if output_format is OutputFormat.json:
            typer.echo("[]")
        typer.echo(f"xattn: shard {shard} holds none of the {len(inputs)} input(s)", err=True)
        return
    if resume and made_by is not None and _all_finished(paths, out, *made_by):  # nothing to do: no model loads
        if output_format is OutputFormat.json:
            typer.echo("[]")
        typer.echo(f"xattn: skipped {len(paths)} finished image(s) (--resume)", err=True)
        return
    try:
        from xattn_cli.device import resolve_device, set_threads
        from xattn_cli.runner import BatchRunner

        set_threads(threads)
        device = resolve_device(device)
        explainer = build_explainer(device)
        runner = BatchRunner(explainer, out, device=device, save_maps=save_maps, batch_size=batch_size,
                             max_pixels=max_pixels, workers=workers, overlays=overlays.value,
                             layout=layout.value)
    except UsageError as error:
        raise fail(str(error)) from None
    collected: list[dict[str, Any]] = []  # only for json and table, which print at the end
    degenerate = 0  # constant maps: no signal, often wrong weights or tokenizer files

    def emit(record: dict[str, Any]) -> None:
        nonlocal degenerate
        degenerate += sum(bool(target.get("degenerate")) for target in record.get("targets", []))
        if output_format is OutputFormat.jsonl:
            sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
            sys.stdout.flush()
        else:
            collected.append(record)

    try:
        with _progress(len(paths), quiet) as advance:
            summary = runner.run(paths, resume=resume, on_record=lambda record: (emit(record), advance()),
                                 named_among=inputs)
    except KeyboardInterrupt:
        typer.echo("xattn: interrupted; finished items are in results.jsonl", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except OSError as error:
        raise fail(f"cannot write to {out}: {error.strerror or error}", EXIT_ITEMS_FAILED) from None
    except UsageError as error:
        raise fail(str(error)) from None
    if output_format is OutputFormat.json:
        typer.echo(json.dumps(collected, ensure_ascii=False, indent=2))
    elif output_format is OutputFormat.table:
        _print_table(collected)
    if degenerate:
        typer.echo(f"xattn: {degenerate} map(s) are degenerate (constant, no signal); check the weights and "
                   "tokenizer files", err=True)
    if summary.skipped:
        typer.echo(f"xattn: skipped {summary.skipped} finished image(s) (--resume)", err=True)
    if summary.failed:
        typer.echo(f"xattn: {summary.failed} of {summary.ok + summary.failed} image(s) failed; "
                   "see their error records", err=True)
        raise typer.Exit(EXIT_ITEMS_FAILED)


def _run_on_every_gpu(stdin_text: str | None, output_format: OutputFormat) -> int:
    """This command once per visible GPU (see `xattn_cli.fanout`); its exit code."""
    import torch

    from xattn_cli.fanout import run_per_device

    devices = [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    if not devices:
        raise fail(f"--device {ALL_GPUS} needs CUDA, and no GPU is visible on this machine")
    records: list[dict[str, Any]] = []

    def on_line(line: str) -> None:
        if output_format is OutputFormat.jsonl:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
        else:
            records.append(json.loads(line))

    typer.echo(f"xattn: one worker on each of {len(devices)} GPUs", err=True)
    code = run_per_device(sys.argv[1:], devices, stdin_text=stdin_text, on_line=on_line)
    if output_format is OutputFormat.json:
        typer.echo(json.dumps(records, ensure_ascii=False, indent=2))
    elif output_format is OutputFormat.table:
        _print_table(records)
    return code


def _all_finished(paths: list[str], out: Path, model: str, method: str) -> bool:
    """Whether --resume would skip every image of this model and method (a killed run's unfinished writes are
    removed, as a run would). A model named otherwise than its records (an alias) is loaded and checked."""
    from xattn_cli.io.outputs import RESULTS_FILE_NAME, ResultsLog

    if not (out / RESULTS_FILE_NAME).is_file():
        return False
    with ResultsLog(out) as log:
        log.remove_unfinished_writes()
        return set(paths) <= log.done_items(model, method)


class _progress:
    """A rich progress bar on stderr when it is a terminal; otherwise nothing."""

    def __init__(self, total: int, quiet: bool):
        self.total, self.enabled = total, not quiet and sys.stderr.isatty()

    def __enter__(self) -> Callable[[], None]:
        if not self.enabled:
            return lambda: None
        from rich.console import Console
        from rich.progress import Progress

        self.progress = Progress(console=Console(stderr=True), transient=True)
        self.progress.start()
        task = self.progress.add_task("explaining", total=self.total)
        return lambda: self.progress.advance(task)

    def __exit__(self, *exc_info: object) -> None:
        if self.enabled:
            self.progress.stop()


def _print_table(records: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("image", "status", "target", "score", "peak", "overlay / error")
    for record in records:
        if record["status"] != "ok":
            table.add_row(record["image"], "[red]error[/red]", "", "", "",
                          f"{record['error']['type']}: {record['error']['message']}")
            continue
        if not record["targets"]:
            table.add_row(record["image"], "ok", "(none)", "", "", "")
        for target in record["targets"]:
            status = "[yellow]degenerate[/yellow]" if target.get("degenerate") else "ok"
            table.add_row(record["image"], status, _target_cell(target), f"{target['score']:.4f}", str(target["peak"]),
                          target["overlay"])
    Console().print(table)


def _target_cell(target: dict[str, Any]) -> str:
    """The target, the answer a VQA model gave, and the token relevances when there are any."""
    cell = f"{target['target']} → {target['answer']}" if "answer" in target else target["target"]
    if target.get("tokens"):
        cell += "\n" + " ".join(f"{token['token']} {token['relevance']:.2f}" for token in target["tokens"])
    return cell
