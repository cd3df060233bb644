"""`xattn bench`: measured faithfulness (`quality`) and speed (`perf`)."""
from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from xattn_cli.cli import _options as opt
from xattn_cli.eval import BASELINES, DEFAULT_SANITY_SCENES, DEFAULT_SCENES, HELD_OUT_SEED, PERTURBATIONS
from xattn_cli.methods import MAP_EXPLAINERS, MASK_EXPLAINERS, method_names

app = typer.Typer(help="Measure explanations: faithfulness against ground truth, and speed.",
                  no_args_is_help=True)


def _names(values: list[str] | None) -> list[str]:
    """Repeated and comma-separated option values, in order."""
    return [part.strip() for value in values or [] for part in value.split(",") if part.strip()]


Perturb = Enum("Perturb", {name: name for name in PERTURBATIONS}, type=str)


@app.command("quality")
def quality(
    data: Annotated[Optional[Path], typer.Option("--data", help="Dataset folder (images/, masks/, annotations.jsonl) [default: a generated held-out set].", show_default=False)] = None,
    models: Annotated[Optional[list[str]], typer.Option("--models", help="Models to measure; repeat or comma-separate [default: every bundled model].", show_default=False)] = None,
    methods: Annotated[Optional[list[str]], typer.Option("--methods", help=f"{', '.join(method_names(MAP_EXPLAINERS))}, and the baselines {', '.join(BASELINES)}; repeat or comma-separate [default: all these]. Also {', '.join(method_names(MASK_EXPLAINERS))} (learned token masks: ~100 model passes per target).", show_default=False)] = None,
    json_file: Annotated[Optional[Path], typer.Option("--json", help="Also write the results here as JSON (`xattn report` renders its folder).")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Also draw the results here as a PNG.")] = None,
    scenes: Annotated[int, typer.Option("--scenes", min=1, help="Held-out scenes to generate (without --data).")] = DEFAULT_SCENES,
    seed: Annotated[int, typer.Option("--seed", help="Held-out stream (without --data).")] = HELD_OUT_SEED,
    style: Annotated[str, typer.Option("--style", help="World style of the generated held-out scenes (without --data): classic, varied, or shifted (the style-shifted validation renderer).")] = "classic",
    perturb: Annotated[Perturb, typer.Option("--perturb", help="How perturbation removes tokens: black out their patches (pixels), or mask their keys in every attention layer, as `xattn mask` does (attention).")] = Perturb.pixels,
    sanity: Annotated[bool, typer.Option("--sanity", help="Also randomise the blocks the image passes through, from the top, and report how much each method's maps change (Spearman ρ); flag those that do not.")] = False,
    sanity_scenes: Annotated[int, typer.Option("--sanity-scenes", min=1, help="Scenes used by --sanity.")] = DEFAULT_SANITY_SCENES,
    resamples: Annotated[int, typer.Option("--resamples", min=100, help="Bootstrap resamples for the 95% intervals.")] = 1000,
    device: opt.DeviceOpt = "auto",
    threads: Annotated[int, typer.Option("--threads", min=1, help="CPU threads for torch. The tiny bundled models run fastest on one (2 threads were 6x slower on 2 shared cores); raise it for large models on free cores.")] = 1,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines on stderr.")] = False,
) -> None:
    """Faithfulness of each method's maps against ground-truth masks: pointing game, mIoU, energy in the mask,
    positive and negative perturbation AUC, with 95% bootstrap intervals; random and centre maps as floors."""
    import torch

    from xattn_cli.cli._run import EXIT_ITEMS_FAILED, fail
    from xattn_cli.errors import UsageError
    from xattn_cli.eval.quality import DEFAULT_METHODS, default_models, format_tables, run_quality
    from xattn_cli.device import resolve_device
    from xattn_cli.io.outputs import atomic_write_bytes

    def log(line: str) -> None:
        if not quiet:
            typer.echo(f"xattn: {line}", err=True)

    torch.set_num_threads(threads)
    try:
        result = run_quality(_names(models) or default_models(perturb.value), _names(methods) or DEFAULT_METHODS, data=data,
                             scenes=scenes, seed=seed, style=style, perturb=perturb.value, device=resolve_device(device),
                             resamples=resamples, sanity_scenes=sanity_scenes if sanity else 0, log=log)
    except UsageError as error:
        raise fail(str(error)) from None
    typer.echo(format_tables(result))
    try:
        if json_file:
            json_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(json_file, json.dumps(result, indent=2, ensure_ascii=False).encode())
        if plot:
            from xattn_cli.render.plots import quality_figure

            plot.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(plot, quality_figure(result))
    except OSError as error:
        raise fail(f"cannot write {error.filename}: {error.strerror or error}", EXIT_ITEMS_FAILED) from None


@app.command("perf")
def perf(
    model: Annotated[str, typer.Option("--model", "-m", help="Model name (see `xattn models`), e.g. openclip:ViT-B-16.")] = "shapes-clip",
    method: Annotated[str, typer.Option("--method", help=f"{', '.join(method_names(MAP_EXPLAINERS))} [default: surgery for CLIP models, else chefer].", show_default=False)] = "",
    pretrained: opt.PretrainedOpt = None,
    batch_size: opt.BatchSizeOpt = 16,
    texts: Annotated[int, typer.Option("--texts", min=1, help="CLIP models: number of texts explained per image.")] = 20,
    loop_items: Annotated[int, typer.Option("--loop-items", min=1, help="Images timed through the batch-1 fp32 loop (it is slow).")] = 2,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Timed batches per row, after a warm-up batch.")] = 1,
    device: opt.DeviceOpt = "auto",
    precision: opt.PrecisionOpt = opt.Precision.fp32,
    json_file: Annotated[Optional[Path], typer.Option("--json", help="Also write the results here as JSON.")] = None,
    end_to_end: Annotated[bool, typer.Option("--end-to-end", help="Instead: the method over decoded scenes against the CLI's run over the same scenes as files (decode, model, files, manifest), with --overlays none, none + --save-maps, and png.")] = False,
    scenes: Annotated[int, typer.Option("--scenes", min=1, help="With --end-to-end: scenes in the folder.")] = 200,
    threads: opt.ThreadsOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines on stderr.")] = False,
) -> None:
    """Speed and peak memory of a method against the bare model and a batch-1 fp32 loop, in one run."""
    from xattn_cli.cli._run import EXIT_ITEMS_FAILED, fail
    from xattn_cli.errors import UsageError
    from xattn_cli.eval.end_to_end import format_end_to_end, run_end_to_end
    from xattn_cli.eval.perf import describe_run, format_perf, method_explainer, perf_texts, run_perf
    from xattn_cli.device import autocast, resolve_device, set_threads
    from xattn_cli.io.outputs import atomic_write_bytes
    from xattn_cli.models.registry import load_model

    def progress(line: str) -> None:
        if not quiet:
            typer.echo(f"xattn: {line}", err=True)

    set_threads(threads)
    try:
        device_name = resolve_device(device)
        adapter = load_model(model, pretrained, device_name)
        autocast(device_name, precision.value)
        chosen = method or ("surgery" if "surgery" in adapter.layout.explainers else "chefer")
        if end_to_end:
            explainer = method_explainer(adapter, chosen, perf_texts(texts), precision.value)
            result = {**describe_run(adapter, chosen, precision.value, batch_size, texts),
                      **run_end_to_end(explainer, scenes=scenes, batch_size=batch_size, device=device_name,
                                       progress=progress)}
        else:
            result = run_perf(adapter, method=chosen, batch_size=batch_size, texts=perf_texts(texts),
                              precision=precision.value, loop_items=min(loop_items, batch_size), repeats=repeats,
                              progress=progress)
    except UsageError as error:
        raise fail(str(error)) from None
    typer.echo(format_end_to_end(result) if end_to_end else format_perf(result))
    if json_file:
        try:
            json_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(json_file, json.dumps(result, indent=2).encode())
        except OSError as error:
            raise fail(f"cannot write {json_file}: {error.strerror or error}", EXIT_ITEMS_FAILED) from None
