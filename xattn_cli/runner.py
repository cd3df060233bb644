"""The batch loop shared by every map command: decode (in workers), explain, write, record.

Each image ends as exactly one record in `results.jsonl`, written after its files are in place;
a bad image becomes an error record and the batch goes on.
"""
from __future__ import annotations

import contextlib
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from PIL import Image

from xattn_cli.errors import ItemError, UsageError
from xattn_cli.explainers.base import Explainer
from xattn_cli.io.images import DEFAULT_MAX_PIXELS
from xattn_cli.io.outputs import (
    OutputNamer,
    ResultsLog,
    atomic_save_npy,
    atomic_save_overlay,
)
from xattn_cli.io.stream import decoded_images, default_workers
from xattn_cli.render.overlay import Box, overlay_heatmap, overlay_kept
from xattn_cli.results import TargetMap

DEFAULT_WRITERS = 2
"""Writer threads: enough to keep encoding off the model's critical path on 2 cores (see benchmarks/perf.md)."""


@dataclass
class RunSummary:
    ok: int = 0
    failed: int = 0
    skipped: int = 0


def run_meta(explainer: Explainer, device: str) -> dict[str, Any]:
    import torch

    from xattn_cli import __version__

    return {"xattn": __version__, "torch": torch.__version__, "device": device, "seed": 0, **explainer.meta()}


def ok_record(image: str, explainer: Explainer, size: tuple[int, int], entries: list[dict[str, Any]],
              started: float, meta: dict[str, Any]) -> dict[str, Any]:
    """An explained image's record: its targets' entries (with their overlay and map paths) and the run's meta
    with the time since `started`. The CLI's batches and the Ray integration both write it."""
    return {"image": image, "status": "ok", "model": explainer.model_name, "method": explainer.method,
            "size": list(size), "targets": entries,
            "meta": {**meta, "elapsed_ms": round(1000 * (time.perf_counter() - started))}}


def error_record(image: str, explainer: Explainer, error: BaseException) -> dict[str, Any]:
    if isinstance(error, ItemError):
        detail = error.to_record()
    else:
        detail = {"type": type(error).__name__, "message": str(error).splitlines()[0] if str(error) else ""}
    return {"image": image, "status": "error", "model": explainer.model_name, "method": explainer.method,
            "error": detail}


Outcome = tuple[str, "Image.Image | None", "list[TargetMap] | BaseException", float]
"""(path, image, its targets or the error that stopped it, when its decoding finished)."""


def explained(explainer: Explainer, items: Iterable[tuple[str, Image.Image | None, BaseException | None]],
              batch_size: int) -> Iterator[Outcome]:
    """The batch loop: decoded items in, one outcome per item out, in order. Items that failed to decode
    pass through; a batch that raises is retried item by item, so one bad item never costs the others."""
    batch: list[tuple[str, Image.Image, float]] = []
    for path, image, error in items:
        if error is not None:
            yield path, None, error, time.perf_counter()
            continue
        batch.append((path, image, time.perf_counter()))
        if len(batch) == batch_size:
            yield from _explain_batch(explainer, batch)
            batch = []
    if batch:
        yield from _explain_batch(explainer, batch)


def _explain_batch(explainer: Explainer, batch: list[tuple[str, Image.Image, float]]) -> Iterator[Outcome]:
    try:
        targets = explainer.explain([image for _, image, _ in batch], [path for path, _, _ in batch])
    except UsageError:
        raise  # the run's options are wrong for every item: a usage error, not N item errors
    except Exception as error:
        if len(batch) > 1:  # find the item that fails; the others still get their results
            for item in batch:
                yield from _explain_batch(explainer, [item])
        else:
            yield batch[0][0], batch[0][1], error, batch[0][2]
        return
    for (path, image, started), image_targets in zip(batch, targets):
        yield path, image, image_targets, started


def detection_boxes(target: TargetMap) -> list[Box]:
    """The box of a detection target, labelled with its class and score; none for other targets."""
    if "box" not in target.extra:
        return []
    x0, y0, x1, y1 = target.extra["box"]
    return [(x0, y0, x1, y1, f"{target.extra['label']} {target.score:.2f}")]


class BatchRunner:
    """Drives an explainer over image paths, writing overlays, maps and the manifest in `out_dir`.

    The model runs on the calling thread; blending, encoding and writing each image's files run on a
    bounded pool of `writers` threads (PIL and zlib release the GIL), at most two batches behind the model.
    Records are appended in input order, a batch at a time with one fsync, each only after its files are
    durable: a kill loses at most the images in flight, which `--resume` redoes.

    `overlays`: "png", "jpg" or "none" (records then name no overlay: maps and scores only). `layout`: "flat"
    or "tree" (see `io.outputs.LAYOUTS`)."""

    def __init__(self, explainer: Explainer, out_dir: str | Path, *, device: str, save_maps: bool = False,
                 batch_size: int = 8, max_pixels: int = DEFAULT_MAX_PIXELS, workers: int | None = None,
                 overlays: str = "png", writers: int = DEFAULT_WRITERS, layout: str = "flat"):
        self.explainer, self.out_dir, self.save_maps, self.overlays = explainer, Path(out_dir), save_maps, overlays
        self.batch_size, self.max_pixels, self.workers = max(1, batch_size), max_pixels, workers
        self.writers, self.layout = max(1, writers), layout
        self.meta = {**run_meta(explainer, device), "out": str(self.out_dir)}  # artifacts are found relative to it
        self.made_by = f"{explainer.model_name}-{explainer.method}"  # in artifact names: runs can share a folder

    def run(self, paths: Sequence[str], resume: bool = False,
            on_record: Callable[[dict[str, Any]], None] = lambda record: None,
            named_among: Sequence[str] | None = None) -> RunSummary:
        """Explain `paths`. Artifact names are made unique among `named_among` (default: `paths`): a shard
        passes every input, so its files are named as a single run over all of them would name them."""
        summary = RunSummary()
        namer = OutputNamer(paths if named_among is None else named_among, self.layout)
        with ResultsLog(self.out_dir) as log, ThreadPoolExecutor(self.writers, "xattn-writer") as pool:
            if resume:
                log.remove_unfinished_writes()  # a killed run's half-written files, never trusted, now gone
            done = log.done_items(self.explainer.model_name, self.explainer.method) if resume else set()
            todo = [path for path in paths if path not in done]
            summary.skipped = len(paths) - len(todo)
            pending: deque[Future[dict[str, Any]]] = deque()  # records whose files are being written, in order

            def record_oldest(count: int) -> None:
                records = [pending.popleft().result() for _ in range(min(count, len(pending)))]
                log.extend(records)
                for record in records:
                    summary.ok += record["status"] == "ok"
                    summary.failed += record["status"] != "ok"
                    on_record(record)

            workers = default_workers(len(todo), self.batch_size) if self.workers is None else self.workers
            decoded = decoded_images(todo, self.max_pixels, workers, lookahead=2 * self.batch_size)
            with contextlib.closing(decoded), contextlib.closing(  # decoding workers stop with the run
                    explained(self.explainer, decoded, self.batch_size)) as outcomes:
                try:
                    for path, image, outcome, started in outcomes:
                        pending.append(pool.submit(self._record, path, image, outcome, started, namer))
                        if len(pending) >= 2 * self.batch_size:
                            record_oldest(self.batch_size)
                finally:  # also on Ctrl-C: the images already explained keep their records
                    record_oldest(len(pending))
        return summary

    def _record(self, path: str, image: Image.Image | None, outcome: list[TargetMap] | BaseException,
                started: float, namer: OutputNamer) -> dict[str, Any]:
        """One image's record, after its files are written (on a writer thread); an error record if it failed."""
        if isinstance(outcome, BaseException):
            return error_record(path, self.explainer, outcome)
        try:
            entries = self._write(path, image, outcome, namer)
        except OSError as error:
            return error_record(path, self.explainer, error)
        return ok_record(path, self.explainer, image.size, entries, started, self.meta)

    def _write(self, path: str, image: Image.Image, targets: list[TargetMap],
               namer: OutputNamer) -> list[dict[str, Any]]:
        """Each target's entry of the record, after writing its overlay and map files."""
        entries = []
        for target in targets:
            entry = target.to_json()
            entry["overlay"] = None
            if self.overlays != "none":
                overlay_path = namer.artifact_path(self.out_dir, path, target.target, self.overlays, self.made_by)
                overlay_path.parent.mkdir(parents=True, exist_ok=True)  # a tree layout's folder
                if self.explainer.spec.explainer == "mask":  # a binary mask: the kept patches outlined
                    overlay = overlay_kept(image, target.map)
                else:
                    overlay = overlay_heatmap(image, target.map, points=target.extra.get("points"),
                                              boxes=detection_boxes(target))
                atomic_save_overlay(overlay_path, overlay, self.overlays)
                entry["overlay"] = str(overlay_path)
            entry["map"] = None
            if self.save_maps:
                map_path = namer.artifact_path(self.out_dir, path, target.target, "npy", self.made_by)
                map_path.parent.mkdir(parents=True, exist_ok=True)
                atomic_save_npy(map_path, target.map)
                entry["map"] = str(map_path)
            entries.append(entry)
        return entries
