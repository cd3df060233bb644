"""CATT dictionaries (Yang et al., "Causal Attention for Vision-Language Tasks", CVPR 2021): k-means in torch
and the `.safetensors` file that keeps the entries with the real regions nearest to each.

The paper builds the cross-sample dictionary by k-means over training features; the official code
(yangxuntu/lxmertcatt) instead learns it from U[0, 0.01) and its k-means branch is dead code. Here it is
k-means (frozen entries that are clusters with members, so explanations can show what an entry *is*):
k-means++ seeding from a seeded generator, Lloyd steps on chunked distances with float64 sums, an empty
cluster re-seeded with the point farthest from its centroid, stop when no assignment changes.

File (format `xattn-dictionary/1`):

    dictionary    (K, D)          float32 entries (centroids)
    counts        (K,)            int64, points assigned to each entry
    members       (K, M, 2)       int64 (image row in `names`, region index) of the M points nearest each entry
    member_crops  (K, M, S, S, 3) uint8 image crops of those regions
    metadata: format, names (JSON list of image names), and free-form strings (model, feature, seed, ...)

No model or CLI knowledge here: callers hand in the points, where they came from, and the crops, or a
function from images to the tokens a causal attention reads (`build_dictionary`, what `xattn dictionary
build` and the shapes-catt recipe run).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from xattn_cli.errors import UsageError

FORMAT = "xattn-dictionary/1"


@dataclass
class KMeans:
    centroids: torch.Tensor  # (K, D) float64
    labels: torch.Tensor  # (N,) int64, the nearest centroid of each point
    counts: torch.Tensor  # (K,) int64
    inertias: list[float]  # Σ squared distance to the nearest centroid, after each assignment
    converged: bool  # the last Lloyd step changed no assignment

    @property
    def inertia(self) -> float:
        return self.inertias[-1]


def _nearest(points: torch.Tensor, centroids: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of and squared distance to the nearest centroid, (N,) each, `chunk` points at a time (float64)."""
    squared_norms = centroids.square().sum(1)  # (K,)
    labels, distances = [], []
    for start in range(0, points.shape[0], chunk):
        part = points[start:start + chunk].double()  # (n, D)
        squared = (part.square().sum(1, keepdim=True) - 2 * part @ centroids.T + squared_norms).clamp_min(0)  # (n, K)
        distance, label = squared.min(1)
        labels.append(label)
        distances.append(distance)
    return torch.cat(labels), torch.cat(distances)


def kmeans_plus_plus(points: torch.Tensor, k: int, generator: torch.Generator, chunk: int = 65536) -> torch.Tensor:
    """k-means++ seeds (Arthur & Vassilvitskii 2007): the first uniform, each next drawn ∝ squared distance
    to the nearest seed so far (uniform if every point already sits on a seed). (K, D) float64."""
    first = int(torch.randint(points.shape[0], (1,), generator=generator))
    seeds = [points[first].double()]
    squared = _nearest(points, seeds[0][None], chunk)[1]  # (N,)
    for _ in range(1, k):
        weights = squared.cpu() if float(squared.sum()) > 0 else torch.ones(points.shape[0])
        chosen = int(torch.multinomial(weights, 1, generator=generator))
        seeds.append(points[chosen].double())
        squared = torch.minimum(squared, _nearest(points, seeds[-1][None], chunk)[1])
    return torch.stack(seeds)


def _means(points: torch.Tensor, labels: torch.Tensor, squared: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Each cluster's mean (float64 sums); an empty cluster takes the point farthest from its own centroid
    (several empty ones: the farthest points, in order)."""
    sums = torch.zeros(k, points.shape[1], dtype=torch.float64, device=points.device)
    for start in range(0, points.shape[0], chunk):
        sums.index_add_(0, labels[start:start + chunk], points[start:start + chunk].double())
    counts = torch.bincount(labels, minlength=k)
    centroids = sums / counts.clamp_min(1)[:, None]  # (K, D)
    empty = torch.nonzero(counts == 0).flatten()
    if len(empty):
        farthest = squared.argsort(descending=True, stable=True)[:len(empty)]
        centroids[empty] = points[farthest].double()
    return centroids


def lloyd(points: torch.Tensor, centroids: torch.Tensor, iters: int = 100, chunk: int = 65536) -> KMeans:
    """Lloyd steps from `centroids` (K, D) until no assignment changes or `iters` steps."""
    k = centroids.shape[0]
    centroids = centroids.double()
    labels, squared = _nearest(points, centroids, chunk)
    inertias, converged = [float(squared.sum())], False
    for _ in range(iters):
        centroids = _means(points, labels, squared, k, chunk)
        new_labels, squared = _nearest(points, centroids, chunk)
        inertias.append(float(squared.sum()))
        converged = torch.equal(new_labels, labels)
        labels = new_labels
        if converged:
            break
    return KMeans(centroids, labels, torch.bincount(labels, minlength=k), inertias, converged)


def kmeans(points: torch.Tensor, k: int, *, seed: int, iters: int = 100, chunk: int = 65536) -> KMeans:
    """k-means of `points` (N, D): k-means++ seeds from `torch.Generator().manual_seed(seed)`, then Lloyd."""
    if points.dim() != 2 or not 1 <= k <= points.shape[0]:
        raise UsageError(f"k-means needs 1 ≤ k ≤ the number of points; got k={k} for {points.shape[0]} points")
    generator = torch.Generator().manual_seed(seed)
    return lloyd(points, kmeans_plus_plus(points, k, generator, chunk), iters, chunk)


def nearest_points(points: torch.Tensor, centroids: torch.Tensor, count: int, chunk: int = 65536) -> torch.Tensor:
    """The `count` points nearest each centroid, nearest first: (K, count) indices into `points`."""
    best_distance = torch.full((centroids.shape[0], 0), float("inf"), dtype=torch.float64, device=points.device)
    best_index = torch.zeros(centroids.shape[0], 0, dtype=torch.long, device=points.device)
    centroids = centroids.double()
    for start in range(0, points.shape[0], chunk):
        part = points[start:start + chunk].double()  # (n, D)
        squared = torch.cdist(centroids, part).square()  # (K, n)
        index = torch.arange(start, start + part.shape[0], device=points.device).expand_as(squared)  # (K, n)
        distance, order = torch.cat([best_distance, squared], 1).topk(min(count, start + part.shape[0]), 1, largest=False)
        best_index = torch.cat([best_index, index], 1).gather(1, order)
        best_distance = distance
    return best_index


def region_crop(image: Image.Image, box: tuple[float, float, float, float], size: int = 16) -> torch.Tensor:
    """A region (x0, y0, x1, y1 as fractions of the width and height) resized to (size, size, 3) uint8."""
    width, height = image.size
    x0, y0, x1, y1 = box
    pixels = (round(x0 * width), round(y0 * height), max(round(x1 * width), round(x0 * width) + 1),
              max(round(y1 * height), round(y0 * height) + 1))
    crop = image.convert("RGB").crop(pixels).resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(crop).copy())  # (S, S, 3) uint8


@dataclass
class DictionaryFile:
    """What a dictionary file holds (see the module docstring for shapes)."""

    entries: torch.Tensor  # (K, D) float32
    counts: torch.Tensor  # (K,) int64
    members: torch.Tensor  # (K, M, 2) int64
    crops: torch.Tensor  # (K, M, S, S, 3) uint8
    names: list[str]
    info: dict[str, str] = field(default_factory=dict)
    path: str | None = None  # the absolute path it was read from (None: built in memory)
    sha256: str | None = None  # the file's bytes' sha256, to tell a file changed since a run used it


def _check(dictionary: DictionaryFile) -> str | None:
    """What is wrong with the tensors' shapes, types or member indices, or None."""
    entries, counts, members, crops = dictionary.entries, dictionary.counts, dictionary.members, dictionary.crops
    if entries.dim() != 2 or not entries.is_floating_point():
        return f"dictionary must be a (K, D) float tensor, got {tuple(entries.shape)} {entries.dtype}"
    k = entries.shape[0]
    if counts.shape != (k,) or counts.dtype != torch.int64:
        return f"counts must be ({k},) int64, got {tuple(counts.shape)} {counts.dtype}"
    if members.dim() != 3 or members.shape[0] != k or members.shape[2] != 2 or members.dtype != torch.int64:
        return f"members must be ({k}, M, 2) int64, got {tuple(members.shape)} {members.dtype}"
    if crops.dim() != 5 or crops.shape[:2] != members.shape[:2] or crops.shape[4] != 3 or crops.dtype != torch.uint8:
        return f"member_crops must be ({k}, {members.shape[1]}, S, S, 3) uint8, got {tuple(crops.shape)} {crops.dtype}"
    if members.numel() and not (0 <= int(members[..., 0].min()) and int(members[..., 0].max()) < len(dictionary.names)):
        return f"member image rows must index the {len(dictionary.names)} names"
    return None


def save_dictionary(path: str | Path, dictionary: DictionaryFile) -> None:
    """Write `dictionary` to `path` (.safetensors)."""
    from safetensors.torch import save_file

    problem = _check(dictionary)
    if problem:
        raise UsageError(f"cannot save the dictionary: {problem}")
    metadata = {**dictionary.info, "format": FORMAT, "names": json.dumps(dictionary.names)}
    tensors = {"dictionary": dictionary.entries.float(), "counts": dictionary.counts, "members": dictionary.members,
               "member_crops": dictionary.crops}
    save_file({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, str(path), metadata=metadata)


def load_dictionary(path: str | Path, *, k: int | None = None, dim: int | None = None) -> DictionaryFile:
    """Read and check a dictionary file; with `k` / `dim`, also that its entries have that shape. The result
    keeps the file's absolute path and sha256."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise UsageError(f"dictionary file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as error:  # safetensors raises several types for bad or truncated headers
        raise UsageError(f"{path} is not a readable dictionary file ({type(error).__name__})") from None
    if metadata.get("format") != FORMAT:
        raise UsageError(f"{path} is not an {FORMAT} file (format {metadata.get('format')!r})")
    missing = {"dictionary", "counts", "members", "member_crops"} - set(tensors)
    if missing:
        raise UsageError(f"{path} lacks {', '.join(sorted(missing))}")
    try:
        names = json.loads(metadata.get("names", ""))
    except json.JSONDecodeError:
        names = None
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise UsageError(f"{path}: metadata 'names' must be a JSON list of image names")
    info = {key: value for key, value in metadata.items() if key not in ("format", "names")}
    dictionary = DictionaryFile(tensors["dictionary"], tensors["counts"], tensors["members"], tensors["member_crops"],
                                names, info, str(Path(path).resolve()), file_sha256(path))
    problem = _check(dictionary)
    if problem:
        raise UsageError(f"{path}: {problem}")
    wanted = (k or dictionary.entries.shape[0], dim or dictionary.entries.shape[1])
    if tuple(dictionary.entries.shape) != wanted:
        raise UsageError(f"{path} holds {tuple(dictionary.entries.shape)} entries, this model needs {wanted}")
    return dictionary


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def entry_strip(dictionary: DictionaryFile, entry: int) -> Image.Image:
    """An entry's member crops side by side, nearest member first, pixels as stored: (S, M·S) RGB."""
    crops = dictionary.crops[entry]  # (M, S, S, 3)
    members, size = crops.shape[0], crops.shape[1]
    strip = crops.permute(1, 0, 2, 3).reshape(size, members * size, 3)  # (S, M·S, 3): row y of each crop in turn
    return Image.fromarray(strip.numpy())


@dataclass
class Tokens:
    """Real region tokens gathered from images: (N, D) points, each one's image row and region index, and the
    region's box (fractions of the image)."""

    points: torch.Tensor  # (N, D) float32
    sources: torch.Tensor  # (N, 2) int64: image row in `names`, region index
    boxes: torch.Tensor  # (N, 4) float32
    names: list[str]
    paths: list[str]

    def subset(self, index: torch.Tensor) -> "Tokens":
        """The tokens at `index` (M,), image names and paths kept whole."""
        return Tokens(self.points[index], self.sources[index], self.boxes[index], self.names, self.paths)


def gather_tokens(features_of: Callable, paths: Sequence[str], names: Sequence[str], *, batch_size: int = 32,
                  load: Callable | None = None, on_error: Callable[[str, BaseException], None] = lambda *_: None
                  ) -> Tokens:
    """`features_of(images)` → regions (features (B, R, D), boxes (B, R, 4), mask (B, R)) over `paths` in
    batches; only real regions are kept. An image `load(path)` cannot read (an `ItemError`) goes to
    `on_error(path, error)` and is skipped."""
    from xattn_cli.errors import ItemError
    from xattn_cli.io.images import load_image

    load = load or load_image
    points, sources, boxes, kept_names, kept_paths = [], [], [], [], []
    for start in range(0, len(paths), batch_size):
        images = []
        for path, name in zip(paths[start:start + batch_size], names[start:start + batch_size]):
            try:
                images.append(load(path))
            except ItemError as error:
                on_error(path, error)
                continue
            kept_names.append(name)
            kept_paths.append(path)
        if not images:
            continue
        regions = features_of(images)
        first_row = len(kept_names) - len(images)
        for b in range(len(images)):
            real = torch.nonzero(regions.mask[b] > 0).flatten().cpu()  # (n,)
            points.append(regions.features[b].detach().float().cpu()[real])  # (n, D)
            boxes.append(regions.boxes[b].detach().float().cpu()[real])  # (n, 4)
            sources.append(torch.stack([torch.full_like(real, first_row + b), real], dim=1))  # (n, 2)
    if not points:
        return Tokens(torch.zeros(0, 0), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 4), [], [])
    return Tokens(torch.cat(points), torch.cat(sources), torch.cat(boxes), kept_names, kept_paths)


def build_dictionary(tokens: Tokens, k: int, *, seed: int = 0, iters: int = 100, members: int = 3,
                     max_points: int | None = None, crop_size: int = 16, load: Callable | None = None,
                     info: dict[str, str] | None = None) -> DictionaryFile:
    """k-means of `tokens` (a seeded random subset of `max_points` when there are more) into a dictionary
    file, its entries described by `describe_entries` over the clustered points."""
    if max_points is not None and tokens.points.shape[0] > max_points:
        generator = torch.Generator().manual_seed(seed)
        tokens = tokens.subset(torch.randperm(tokens.points.shape[0], generator=generator)[:max_points].sort().values)
    if not 1 <= k <= tokens.points.shape[0]:
        raise UsageError(f"cannot make {k} dictionary entries from {tokens.points.shape[0]} region tokens")
    result = kmeans(tokens.points, k, seed=seed, iters=iters)
    described = {**(info or {}), "k": str(k), "seed": str(seed), "inertia": f"{result.inertia:.6g}"}
    return describe_entries(tokens, result.centroids.float(), members=members, crop_size=crop_size, load=load,
                            info=described)


def describe_entries(tokens: Tokens, entries: torch.Tensor, *, members: int = 3, crop_size: int = 16,
                     load: Callable | None = None, info: dict[str, str] | None = None) -> DictionaryFile:
    """A dictionary file of `entries` (K, D) described by `tokens`: each entry's count (the tokens nearest
    to it), its `members` nearest tokens (image row, region) and their crops, re-read from the images with
    `load` (default: image files)."""
    from xattn_cli.io.images import load_image

    load = load or load_image
    entries = entries.detach().float().cpu()
    labels, _ = _nearest(tokens.points, entries.double(), 65536)
    nearest = nearest_points(tokens.points, entries, min(members, tokens.points.shape[0]))  # (K, M)
    images: dict[int, Image.Image] = {}
    crops = []
    for index in nearest.flatten().tolist():
        row = int(tokens.sources[index, 0])
        if row not in images:
            images[row] = load(tokens.paths[row])
        crops.append(region_crop(images[row], tuple(tokens.boxes[index].tolist()), crop_size))
    crops = torch.stack(crops).view(*nearest.shape, crop_size, crop_size, 3)  # (K, M, S, S, 3)
    return DictionaryFile(entries, torch.bincount(labels, minlength=entries.shape[0]), tokens.sources[nearest], crops,
                          tokens.names, {**(info or {}), "points": str(tokens.points.shape[0])})
