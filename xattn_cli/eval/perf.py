"""Speed of each explanation method against the bare model, measured in one run (DESIGN §6).

Three rows per method, on the same images, batch size and precision:
- `bare`: what the model costs anyway. Surgery: preprocessing and the image encoder. Relevancy: the same
  forward and one full backward pass per target, with nothing recorded; and a second row, `bare, the
  method's own backward`, with exactly the explainer's autograd work (backward from its start blocks, the
  text tower once per text) on the model's own attention path: the cost of recording and the rules.
- the method, end to end as the CLI runs it (maps at image size included, files not written).
- `batch-1 loop`: the official code's procedure, one image at a time in fp32. For surgery it comes twice:
  with the prompt ensemble re-encoded for every image (as the official demo runs it) and with it cached.
  For relevancy it follows the official notebooks: CLIP repeats the image once per text, and every backward
  pass reaches the parameters.
"""
from __future__ import annotations

import ctypes
import gc
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from xattn_cli.capture import AttentionRecorder
from xattn_cli.capture.gradients import (
    first_gradient_sites,
    gradients_from,
    input_gradients_only,
)
from xattn_cli.device import autocast
from xattn_cli.errors import UsageError
from xattn_cli.explainers import build_relevancy
from xattn_cli.explainers.base import Explainer
from xattn_cli.explainers.surgery import SurgeryExplainer
from xattn_cli.methods import method_spec
from xattn_cli.methods.relevancy import token_relevance
from xattn_cli.methods.surgery import text_ensemble
from xattn_cli.text import ensemble_templates
from xattn_cli.world.shapes import COLORS, SHAPES, scene_at


@dataclass
class Measurement:
    name: str
    items: int
    seconds: float
    peak_mb: float  # peak memory above what was in use before the call (CUDA: allocated; CPU: resident)

    @property
    def items_per_s(self) -> float:
        return self.items / self.seconds


def perf_texts(count: int) -> list[str]:
    """`count` distinct shapes-world captions ("a red circle", ...), colours varying fastest."""
    captions = [f"a {color} {shape}" for shape in SHAPES for color in COLORS]
    if not 1 <= count <= len(captions):
        raise UsageError(f"the number of texts must be in 1..{len(captions)}")
    return captions[:count]


def perf_images(count: int, size: int = 224) -> list[Image.Image]:
    return [scene_at(4242, i, size=size).image for i in range(count)]


class _PeakMemory:
    """Peak memory of a block, above the level at its start, in MiB."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __enter__(self) -> "_PeakMemory":
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            _reset_resident_peak()
            self.start = _resident("VmRSS")
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _resident("VmHWM")
        self.peak_mb = max(0.0, (peak - self.start) / 2**20)


def _resident(field: str) -> int:
    """VmRSS or VmHWM of this process in bytes (Linux); 0 where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_resident_peak() -> None:
    """Hand freed heap back to the OS (glibc), then restart the peak from the current resident size."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def measure(name: str, run: Callable[[], object], items: int, device: str, repeats: int = 1,
            warmup: bool = True) -> Measurement:
    """Time `repeats` calls of `run` (each handling `items` items), after one warm-up call if asked."""
    if warmup:
        run()
    gc.collect()
    with _PeakMemory(device) as memory:
        started = time.perf_counter()
        for _ in range(repeats):
            run()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    return Measurement(name, items * repeats, seconds, memory.peak_mb)


def bare_clip_forward(adapter, images: Sequence[Image.Image], precision: str) -> Callable[[], torch.Tensor]:
    device = str(adapter.device)

    @torch.inference_mode()
    def run() -> torch.Tensor:
        pixels = adapter.preprocess(images, adapter.native_size)  # (B, 3, H, W)
        with autocast(device, precision):
            return adapter.encode_image(pixels)  # (B, E)
    return run


def bare_backward(adapter, images: Sequence[Image.Image], texts: Sequence[str], precision: str,
                  explainer=None) -> Callable[[], None]:
    """One backward pass per target (CLIP: per text; a classifier: its first label), nothing recorded.

    Without `explainer`: the model's full forward and backward, to the pixels, the text tower run on B copies of
    each text. With it: exactly that explainer's autograd work (backward from its start blocks, the text tower
    once per text), on the model's own attention path: what recording and the rules add is the difference.
    """
    device = str(adapter.device)
    if explainer is None:
        gradients, text_copies = (lambda: input_gradients_only(adapter.model)), len(images)
    else:
        start_layers = explainer.start_layers if texts else {"vision": explainer.start_layer}
        starts = first_gradient_sites(adapter.attention_sites(), start_layers, explainer.spec.last_layer_only)
        gradients = lambda: gradients_from(adapter.model, starts, len(images))  # noqa: E731
        text_copies = 1  # widened to the batch at the start block

    def run() -> None:
        pixels = adapter.preprocess(images, adapter.native_size).requires_grad_(explainer is None)  # (B, 3, H, W)
        with gradients():
            with autocast(device, precision):
                output = adapter.encode_image(pixels) if texts else adapter.classify(pixels)
            if not texts:
                output.float()[:, 0].sum().backward()  # one target per image, as the explainer is given
                return
            image_embedding = F.normalize(output.float(), dim=-1)  # (B, E)
            for k, text in enumerate(texts):
                with autocast(device, precision):
                    text_embedding = adapter.encode_tokens(adapter.tokenize([text] * text_copies))
                similarity = (image_embedding * F.normalize(text_embedding.float(), dim=-1)).sum()
                similarity.backward(retain_graph=k < len(texts) - 1)
    return run


def surgery_loop(adapter, images: Sequence[Image.Image], texts: Sequence[str], *, reencode: bool) -> Callable[[], None]:
    """One image at a time in fp32; with `reencode`, the 85-template ensemble is encoded for each image."""
    explainer = SurgeryExplainer(adapter, texts, text_cache=False)

    @torch.inference_mode()
    def run() -> None:
        for image in images:
            if reencode:
                explainer.text_features = text_ensemble(adapter.encode_text, list(texts), ensemble_templates())
            explainer.explain([image])
    return run


def relevancy_loop(adapter, images: Sequence[Image.Image], texts: Sequence[str], method: str) -> Callable[[], None]:
    """The official notebooks' procedure, one image at a time in fp32: CLIP repeats the image once per text
    and runs one forward and one backward of the diagonal similarities; a classifier backpropagates the logit
    the method row explains. Backward passes reach every parameter (`model.zero_grad()`,
    `backward(retain_graph=True)`)."""
    sites = adapter.attention_sites()
    start_layer = max(site.layer for site in sites if site.stream == "vision") if texts else adapter.default_start_layer

    def run() -> None:
        for image in images:
            adapter.model.zero_grad(set_to_none=True)
            with torch.enable_grad(), AttentionRecorder(sites) as recording:
                pixels = adapter.preprocess([image] * max(1, len(texts)), adapter.native_size)  # (K, 3, H, W)
                if texts:
                    image_embedding = F.normalize(adapter.encode_image(pixels), dim=-1)  # (K, E)
                    text_embedding = F.normalize(adapter.encode_tokens(adapter.tokenize(list(texts))), dim=-1)
                    score = (image_embedding * text_embedding).sum()  # the one-hot diagonal of logits_per_image
                else:
                    score = adapter.classify(pixels)[:, 0].sum()
                if method_spec(method).needs_gradients:
                    score.backward(retain_graph=True)
                token_relevance(method, recording.select(stream="vision"), start_layer)
        adapter.model.zero_grad(set_to_none=True)
    return run


def startup_seconds(command: Sequence[str], repeats: int = 5) -> float | None:
    """Median wall time of a fresh process running `command`; None if it fails."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        if subprocess.run(command, capture_output=True).returncode != 0:
            return None
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def method_explainer(adapter, method: str, texts: Sequence[str], precision: str) -> Explainer:
    """The explainer `bench perf` times: surgery, or the relevancy method for the adapter's task (CLIP models
    explain `texts`, classifiers their first label); usage errors for a method or model it does not measure."""
    if adapter.layout.task not in ("image-text", "classify"):
        raise UsageError(f"bench perf measures CLIP models and classifiers; {adapter.name} is neither")
    method_spec(method, None if method == "surgery" else adapter.layout.rule, adapter.name)  # unknown names first
    if method == "surgery":
        return SurgeryExplainer(adapter, texts, precision=precision)
    clip = adapter.layout.task == "image-text"
    return build_relevancy(adapter, method=method, precision=precision, texts=texts if clip else [],
                           targets=[] if clip else [adapter.labels[0]])


def run_perf(adapter, *, method: str, batch_size: int, texts: Sequence[str], precision: str,
             loop_items: int, repeats: int = 1, startup: bool = True,
             progress: Callable[[str], None] = lambda line: None) -> dict:
    """Every row for one model and method, with ratios to the bare model and to the batch-1 loop."""
    device = str(adapter.device)
    clip = adapter.layout.task == "image-text"
    texts = list(texts) if clip else []
    explainer = method_explainer(adapter, method, texts, precision)
    spec = explainer.spec
    images = perf_images(batch_size)
    loop_images = images[:loop_items]
    rows: list[Measurement] = []

    def add(name: str, run: Callable[[], object], count: int, loop: bool = False) -> Measurement:
        """Loops run once, unwarmed (the rows before them warmed the model up); the others `repeats` times."""
        progress(f"measuring {name}")
        rows.append(measure(name, run, count, device, 1 if loop else repeats, warmup=not loop))
        return rows[-1]

    if method == "surgery":
        bare = add("bare image encoder", bare_clip_forward(adapter, images, precision), batch_size)
        explained = add("surgery", lambda: explainer.explain(images), batch_size)
        add("batch-1 fp32 loop, text cached", surgery_loop(adapter, loop_images, texts, reencode=False), loop_items,
            loop=True)
        add("batch-1 fp32 loop, text re-encoded", surgery_loop(adapter, loop_images[:1], texts, reencode=True), 1,
            loop=True)
    else:
        if not spec.needs_gradients:
            bare = add("bare forward", _bare_forward(adapter, images, texts, precision), batch_size)
        else:
            bare = add("bare forward+backward", bare_backward(adapter, images, texts, precision), batch_size)
        explained = add(method, lambda: explainer.explain(images), batch_size)
        add("batch-1 fp32 loop", relevancy_loop(adapter, loop_images, texts, method), loop_items, loop=True)
        if spec.needs_gradients:
            same_graph = add("bare, the method's own backward",
                             bare_backward(adapter, images, texts, precision, explainer), batch_size)
    loop = rows[2]
    result = {
        **describe_run(adapter, method, precision, batch_size, len(texts)),
        "rows": [{**asdict(row), "items_per_s": row.items_per_s} for row in rows],
        "method_vs_bare": explained.items_per_s / bare.items_per_s,
        "method_vs_loop": explained.items_per_s / loop.items_per_s,
    }
    if method == "surgery":
        result["method_vs_loop_reencoded"] = explained.items_per_s / rows[3].items_per_s
    elif spec.needs_gradients:
        result["method_vs_own_backward"] = explained.items_per_s / same_graph.items_per_s
    if startup:
        progress("measuring start-up")
        xattn_help = startup_seconds([sys.executable, "-m", "xattn_cli", "--help"])
        import_typer = startup_seconds([sys.executable, "-c", "import typer"])
        if xattn_help is not None and import_typer is not None:
            result["startup"] = {"xattn_help_s": xattn_help, "import_typer_s": import_typer,
                                 "ratio": xattn_help / import_typer}
    return result


def describe_run(adapter, method: str, precision: str, batch_size: int, texts: int) -> dict:
    """What a perf run measured and where: the header of its JSON."""
    return {"model": adapter.name, "method": method, "device": device_name(str(adapter.device)),
            "precision": precision, "batch_size": batch_size,
            "texts": texts if adapter.layout.task == "image-text" else 0, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": sys.version.split()[0]}


def _bare_forward(adapter, images: Sequence[Image.Image], texts: Sequence[str], precision: str) -> Callable[[], object]:
    """Gradient-free methods: the forward passes they record (image tower, and text tower per text)."""
    encode_image = bare_clip_forward(adapter, images, precision) if texts else None
    device = str(adapter.device)

    @torch.inference_mode()
    def run() -> None:
        if encode_image is None:
            with autocast(device, precision):
                adapter.classify(adapter.preprocess(images, adapter.native_size))
            return
        encode_image()
        for text in texts:
            with autocast(device, precision):
                adapter.encode_tokens(adapter.tokenize([text] * len(images)))
    return run


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def format_header(result: dict) -> str:
    return (f"{result['model']} · {result['method']} · {result['device']} · {result['precision']} · "
            f"batch {result['batch_size']} · {result['texts']} texts · torch {result['torch']}")


def format_perf(result: dict) -> str:
    """A plain-text table of one run, ratios below it."""
    lines = [format_header(result), f"{'':36} {'items/s':>9} {'peak MiB':>9} {'items':>6} {'seconds':>8}"]
    for row in result["rows"]:
        lines.append(f"{row['name']:36} {row['items_per_s']:9.2f} {row['peak_mb']:9.0f} {row['items']:6d} "
                     f"{row['seconds']:8.2f}")
    lines.append(f"{result['method']} vs bare: {result['method_vs_bare']:.2f}×   "
                 f"vs batch-1 loop: {result['method_vs_loop']:.1f}×")
    if "method_vs_own_backward" in result:
        lines.append(f"{result['method']} vs the same backward with nothing recorded: "
                     f"{result['method_vs_own_backward']:.2f}×")
    if "method_vs_loop_reencoded" in result:
        lines.append(f"{result['method']} vs batch-1 loop re-encoding the ensemble: "
                     f"{result['method_vs_loop_reencoded']:.1f}×")
    if "startup" in result:
        startup = result["startup"]
        lines.append(f"start-up: xattn --help {startup['xattn_help_s']:.2f} s, import typer "
                     f"{startup['import_typer_s']:.2f} s ({startup['ratio']:.2f}×)")
    return "\n".join(lines)
