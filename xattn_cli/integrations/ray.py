"""Ray Data: explain a dataset of images with `map_batches`, the model loaded once per actor.

    import ray
    from xattn_cli.integrations.ray import explain_dataset

    ds = ray.data.read_binary_files("/shared/images", include_paths=True)  # columns "bytes" and "path"
    results = explain_dataset(ds, model="openclip:ViT-B-16", method="surgery", texts=["a dog", "a cat"],
                              image_column="bytes", name_column="path", num_gpus=1, concurrency=4,
                              maps_dir="/shared/xattn-maps")
    results.write_json("/shared/xattn-results")

Each result row is the record that `xattn surgery|relevancy|mask ... --format jsonl` writes for that image, with
the same fields and values (a failed image gives the CLI's error record), so runs of either can be compared.
No overlays are drawn (the CLI's `--overlays none`): each target's "overlay" is None. Maps are either
returned in a "maps" column, one (K, H, W) float32 array per image (empty for a failed one), or, with
`maps_dir`, written there as .npy files named by each target's "map" (the CLI's `--save-maps`). Rows come
back in no set order.
Needs `pip install "xattn-cli[ray]"`.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import ray.data
from PIL import Image

from xattn_cli.errors import ItemError, UsageError
from xattn_cli.io.images import DEFAULT_MAX_PIXELS, load_image, load_image_bytes
from xattn_cli.io.outputs import atomic_save_npy, slugify
from xattn_cli.methods import method_spec
from xattn_cli.results import TargetMap

DEFAULT_TORCH_THREADS = 1
"""Torch threads per actor. Ray runs `concurrency` actors side by side, each reserving this many CPUs;
threads beyond the cores a process has fight over them (with two threads on two shared cores surgery ran
15× slower, issue 18), so the default is one thread per actor and one actor per reserved core."""


def explain_dataset(ds: ray.data.Dataset, *, model: str, method: str = "surgery", texts: Sequence[str] = (),
                    image_column: str = "image", name_column: str | None = None, maps_dir: str | Path | None = None,
                    pretrained: str | None = None, num_gpus: float = 0, concurrency: int | tuple[int, int] = 1,
                    batch_size: int = 8, torch_threads: int = DEFAULT_TORCH_THREADS,
                    max_pixels: int = DEFAULT_MAX_PIXELS, **options: Any) -> ray.data.Dataset:
    """A dataset of result records, one per row of `ds`, explained by `concurrency` actors that each load
    `model` once (on a GPU each with `num_gpus` > 0, else on `torch_threads` reserved CPUs).

    Args:
        image_column: the column holding each image, as encoded bytes or as a path every actor can read
            (absolute, or relative to each actor's working folder).
        name_column: the column naming each image in its record ("image"); default the path itself. Bytes
            need one, e.g. the "path" column of `ray.data.read_binary_files(..., include_paths=True)`.
        maps_dir: a folder every actor can write (a shared filesystem on a cluster) for the maps as .npy
            files; without it the maps come back in a "maps" column.
        concurrency: the number of actors, or (min, max) for an autoscaling pool. Leave CPUs for the tasks
            that read `ds`: on a 2-CPU node, two 1-CPU actors beside `read_binary_files` wait forever.
        batch_size: images per `map_batches` batch, which is also the model's batch.
        options: those of `xattn_cli.surgery`, `relevancy` or `mask` for `method` (e.g. `ensemble=False`,
            `targets=[...]`, `keep_ratio=0.5`).
    """
    method_spec(method)  # an unknown method fails here, not in every actor
    size = {"size": concurrency} if isinstance(concurrency, int) else dict(zip(("min_size", "max_size"), concurrency))
    settings = {"method": method, "model": model, "pretrained": pretrained, "texts": list(texts), "options": options,
                "device": "cuda" if num_gpus else "cpu", "torch_threads": torch_threads, "batch_size": batch_size,
                "image_column": image_column, "name_column": name_column, "max_pixels": max_pixels,
                "maps_dir": None if maps_dir is None else os.path.abspath(maps_dir)}
    return ds.map_batches(ExplainBatch, fn_constructor_kwargs=settings, batch_size=batch_size, batch_format="numpy",
                          compute=ray.data.ActorPoolStrategy(**size), num_cpus=torch_threads, num_gpus=num_gpus)


class ExplainBatch:
    """The callable class of `explain_dataset`'s `map_batches`: one per actor, which loads the model once."""

    def __init__(self, *, method: str, model: str, pretrained: str | None, texts: list[str], options: dict[str, Any],
                 device: str, torch_threads: int, batch_size: int, image_column: str, name_column: str | None,
                 max_pixels: int, maps_dir: str | None):
        from xattn_cli.api import build_explainer
        from xattn_cli.device import set_threads
        from xattn_cli.runner import run_meta

        set_threads(torch_threads)
        self.explainer = build_explainer(method, model=model, pretrained=pretrained, device=device, texts=texts,
                                         **options)
        self.meta = {**run_meta(self.explainer, device), "out": maps_dir}  # as the CLI's, where the maps are
        self.made_by = f"{self.explainer.model_name}-{self.explainer.method}"
        self.batch_size, self.max_pixels = batch_size, max_pixels
        self.image_column, self.name_column = image_column, name_column
        self.maps_dir = None if maps_dir is None else Path(maps_dir)
        if self.maps_dir is not None:
            self.maps_dir.mkdir(parents=True, exist_ok=True)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        from xattn_cli.runner import error_record, explained, ok_record

        images = batch[self.image_column]
        names = batch[self.name_column] if self.name_column is not None else [None] * len(images)
        items = [self._decoded(value, name) for value, name in zip(images, names)]
        records, maps = [], []
        for name, image, outcome, started in explained(self.explainer, items, self.batch_size):
            if isinstance(outcome, BaseException):
                records.append(error_record(name, self.explainer, outcome))
                maps.append(NO_MAPS)
                continue
            try:
                records.append(ok_record(name, self.explainer, image.size, self._entries(name, outcome), started,
                                         self.meta))
            except OSError as error:  # a full or unwritable maps_dir: an error record, as in the CLI
                records.append(error_record(name, self.explainer, error))
                maps.append(NO_MAPS)
                continue
            maps.append(np.stack([target.map for target in outcome]))  # (K, H, W)
        columns = {key: [record.get(key) for record in records] for key in _RECORD_KEYS}
        if self.maps_dir is None:
            columns["maps"] = maps
        return columns

    def _decoded(self, value: Any, name: Any) -> tuple[str, Image.Image | None, ItemError | None]:
        """(name, image, None) or (name, None, the ItemError the CLI would record)."""
        if name is None and isinstance(value, bytes):
            raise UsageError(f"column {self.image_column!r} holds bytes: give name_column= to name each image")
        name = str(value if name is None else name)
        try:
            image = load_image_bytes(value, name, self.max_pixels) if isinstance(value, bytes) \
                else load_image(str(value), self.max_pixels)
        except ItemError as error:
            return name, None, error
        return name, image, None

    def _entries(self, name: str, targets: list[TargetMap]) -> list[dict[str, Any]]:
        """The targets' entries `runner.BatchRunner` writes with `--overlays none`, after saving their maps."""
        entries = []
        for index, target in enumerate(targets):
            entry = target.to_json()
            entry["overlay"] = None
            entry["map"] = None
            if self.maps_dir is not None:
                map_path = self.maps_dir / _map_name(name, self.made_by, index, target.target)
                atomic_save_npy(map_path, target.map)
                entry["map"] = str(map_path)
            entries.append(entry)
        return entries


NO_MAPS = np.zeros((0, 0, 0), np.float32)
"""The "maps" of an image that failed: an empty array, not None, which some Ray versions cannot put in one
column with arrays."""

_RECORD_KEYS = ("image", "status", "model", "method", "size", "targets", "meta", "error")
"""Every key of an ok or an error record: the columns of a result row (None where a record has no such key)."""


def _map_name(image: str, made_by: str, index: int, target: str) -> str:
    """`<stem>-<hash of the image name>__<model-method>__<target index>-<target>.npy`. An actor sees one batch,
    not every input, so the hash always keeps images of the same stem in different folders apart."""
    digest = hashlib.sha1(image.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{slugify(Path(image).stem)}-{digest}__{slugify(made_by, 40)}__{index}-{slugify(target)}.npy"
