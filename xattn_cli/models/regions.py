"""Visual tokens for region-feature models (LXMERT, VisualBERT): features + boxes per image.

Two sources: `GridRegions` cuts the image into a grid of cells (the bundled shapes-* models are trained on
these; `StemGridRegions` gives each cell the feature of a small trained CNN instead of its raw pixels), and
`NpzRegions` reads boxes and features computed elsewhere (e.g. a bottom-up-attention Faster R-CNN for the public
checkpoints) from one `.npz` file:

    names     (K,)        image file stems
    features  (K, R, D)   float, R regions per image (pad with zeros)
    boxes     (K, R, 4)   x0, y0, x1, y1 in pixels of the original image
    counts    (K,)        optional: how many of the R rows are real regions
"""
from __future__ import annotations

import zipfile

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch
from PIL import Image

from xattn_cli.errors import ItemError, UsageError
from xattn_cli.models.base import Adapter


@dataclass
class Regions:
    """A batch of visual tokens."""

    features: torch.Tensor  # (B, R, D) float
    boxes: torch.Tensor  # (B, R, 4) x0, y0, x1, y1 as fractions of each image's width and height
    mask: torch.Tensor  # (B, R) 1 = a real region, 0 = padding
    grid: tuple[int, int] | None = None  # the regions tile the image row-major on this (rows, cols) grid

    def to(self, device: torch.device | str) -> "Regions":
        return Regions(self.features.to(device), self.boxes.to(device), self.mask.to(device), self.grid)

    def repeat(self, count: int, keep: torch.Tensor | None = None) -> "Regions":
        """One image's regions (B = 1), `count` times; with `keep` (count, R) bool, the others masked out."""
        mask = self.mask.expand(count, -1)  # (count, R)
        features = self.features.expand(count, -1, -1)  # (count, R, D)
        boxes = self.boxes.expand(count, -1, -1)  # (count, R, 4)
        return Regions(features, boxes, mask if keep is None else mask * keep.to(mask), self.grid)


class RegionSource(Protocol):
    def __call__(self, images: Sequence[Image.Image], names: Sequence[str]) -> Regions: ...


class GridRegions:
    """Each cell of a rows × cols grid is a region; its feature is the cell's pixels, `cell` × `cell`,
    scaled to [-1, 1] and flattened (D = 3 · cell²)."""

    def __init__(self, grid: tuple[int, int] = (4, 4), cell: int = 4):
        self.grid, self.cell = grid, cell

    @property
    def dim(self) -> int:
        return 3 * self.cell * self.cell

    def __call__(self, images: Sequence[Image.Image], names: Sequence[str] = ()) -> Regions:
        rows, cols = self.grid
        pixels = self.pixels(images)  # (B, rows·c, cols·c, 3)
        batch = pixels.shape[0]
        cells = pixels.view(batch, rows, self.cell, cols, self.cell, 3).permute(0, 1, 3, 2, 4, 5)  # (B, r, c, ch, cw, 3)
        return self.regions(cells.reshape(batch, rows * cols, self.dim))  # features (B, R, D)

    def pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Each image squashed to the grid's pixel size (bilinear), scaled to [-1, 1]. (B, rows·cell, cols·cell, 3)."""
        rows, cols = self.grid
        size = (cols * self.cell, rows * self.cell)  # PIL (W, H)
        pixels = np.stack([np.asarray(image.convert("RGB").resize(size, Image.BILINEAR)) for image in images])
        return torch.from_numpy(pixels).float() / 127.5 - 1.0

    def regions(self, features: torch.Tensor) -> Regions:
        """One region per grid cell, row-major, with these (B, R, D) features."""
        rows, cols = self.grid
        batch = features.shape[0]
        y, x = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        boxes = torch.stack([x / cols, y / rows, (x + 1) / cols, (y + 1) / rows], dim=-1).reshape(1, -1, 4).float()  # (1, R, 4)
        return Regions(features, boxes.expand(batch, -1, -1).clone(), torch.ones(batch, rows * cols), self.grid)


class GridStem(torch.nn.Module):
    """A small CNN that gives one feature per grid cell: one stage per halving (2 ** len(widths) = cell), each a
    stride-2 3×3 convolution and a 3×3 convolution, GELU after both. (B, H, W, 3) in [-1, 1] → (B, R, widths[-1])."""

    def __init__(self, widths: Sequence[int], cell: int):
        super().__init__()
        if 2 ** len(widths) != cell:
            raise ValueError(f"a stem of {len(widths)} stages has stride {2 ** len(widths)}, not the cell size {cell}")
        layers, channels = [], 3
        for width in widths:
            layers += [torch.nn.Conv2d(channels, width, 3, stride=2, padding=1), torch.nn.GELU(),
                       torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.GELU()]
            channels = width
        self.layers = torch.nn.Sequential(*layers)
        self.dim = channels

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        features = self.layers(pixels.permute(0, 3, 1, 2))  # (B, D, rows, cols)
        return features.flatten(2).transpose(1, 2)  # (B, R, D), row-major


class StemGridRegions(GridRegions):
    """Grid regions whose features come from a trained `GridStem` (the bundled shapes-lxmert/-visualbert)."""

    def __init__(self, stem: GridStem, grid: tuple[int, int], cell: int):
        super().__init__(grid, cell)
        self.stem = stem.eval()

    @property
    def dim(self) -> int:
        return self.stem.dim

    @classmethod
    def from_folder(cls, folder: str | Path, spec: dict) -> "StemGridRegions":
        """`spec` = {"grid": [r, c], "cell": n, "stem": {"widths": [...], "weights": FILE in folder}}."""
        from safetensors.torch import load_file

        stem = GridStem(spec["stem"]["widths"], spec["cell"])
        state = load_file(str(Path(folder) / spec["stem"]["weights"]))
        stem.load_state_dict({key: value.float() for key, value in state.items()})
        return cls(stem, tuple(spec["grid"]), spec["cell"])

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image], names: Sequence[str] = ()) -> Regions:
        device = next(self.stem.parameters()).device
        return self.regions(self.stem(self.pixels(images).to(device)))  # features (B, R, D)


class NpzRegions:
    """Precomputed regions, looked up by image file stem (format in the module docstring)."""

    def __init__(self, path: str | Path):
        try:
            with np.load(path, allow_pickle=False) as data:
                names = [str(n) for n in data["names"]]
                features, boxes = data["features"].astype(np.float32), data["boxes"].astype(np.float32)
                counts = data["counts"] if "counts" in data else np.full(len(names), features.shape[1])
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as error:
            detail = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise UsageError(f"cannot read region features from {str(path)!r}: {detail}") from None
        if features.ndim != 3 or boxes.shape != features.shape[:2] + (4,) or len(names) != len(features):
            raise UsageError(f"{path}: expected names (K,), features (K, R, D), boxes (K, R, 4)")
        self.index = {name: k for k, name in enumerate(names)}
        self.features, self.boxes, self.counts, self.path = features, boxes, counts, Path(path)

    def __call__(self, images: Sequence[Image.Image], names: Sequence[str]) -> Regions:
        rows = []
        for image, name in zip(images, names):
            stem = Path(name).stem
            if stem not in self.index:
                raise ItemError("MissingFeatures", f"no region features for {stem!r} in {self.path.name}")
            rows.append(self.index[stem])
        scale = np.array([[image.width, image.height] * 2 for image in images], dtype=np.float32)[:, None, :]
        regions = self.features.shape[1]
        mask = np.arange(regions)[None, :] < np.asarray(self.counts)[rows][:, None]  # (B, R)
        return Regions(torch.from_numpy(self.features[rows]), torch.from_numpy(self.boxes[rows] / scale),
                       torch.from_numpy(mask).float())


class RegionVqaAdapter(Adapter):
    """A VQA model over a question and region features: what `explainers.vqa.VqaRelevancy` needs."""

    name: str
    answers: list[str]

    def __init__(self, model: torch.nn.Module, tokenizer, regions: RegionSource | None = None):
        super().__init__(model)
        self.tokenizer = tokenizer
        self.regions = regions  # where visual tokens come from when the caller gives none

    def tokenize(self, questions: Sequence[str]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(list(questions), padding=True, return_tensors="pt")
        return {key: batch[key].to(self.device) for key in ("input_ids", "attention_mask", "token_type_ids")
                if key in batch}

    def token_words(self, batch: dict[str, torch.Tensor], row: int) -> list[str]:
        length = int(batch["attention_mask"][row].sum())
        return self.tokenizer.convert_ids_to_tokens(batch["input_ids"][row, :length].tolist())

    def target_index(self, answer: str) -> int:
        """An answer name or an index."""
        if answer in self.answers:
            return self.answers.index(answer)
        if answer.isdigit() and int(answer) < len(self.answers):
            return int(answer)
        raise UsageError(f"unknown answer {answer!r}; this model's answers: {', '.join(self.answers[:20])}"
                         + (" ..." if len(self.answers) > 20 else ""))

    def answer_logits(self, batch: dict[str, torch.Tensor], regions: Regions) -> torch.Tensor:
        """(B, answers) logits."""
        raise NotImplementedError

    def question_words(self, batch: dict[str, torch.Tensor], row: int) -> slice:
        """Where the question's words sit among sample `row`'s tokens: between [CLS] and [SEP] (VisualBERT's
        head pools the last of them: the "?", or the last word of a question without one)."""
        return slice(1, int(batch["attention_mask"][row].sum()) - 1)

    def attention_sites(self) -> list:
        raise NotImplementedError


def answer_labels(config) -> list[str]:
    """Answer names from a HF config's id2label, or `answer K` when it has none for every answer."""
    count = getattr(config, "num_qa_labels", None) or config.num_labels
    names = {int(k): v for k, v in (config.id2label or {}).items()}
    return [names.get(k, f"answer {k}") for k in range(count)]


def build_region_vqa(family: str, cfg: dict, tokenizer, answers: Sequence[str]) -> RegionVqaAdapter:
    """A fresh LXMERT or VisualBERT VQA model of `cfg` (its "hf_config" and "regions": grid, cell, stem
    widths) with `answers` as labels, as the adapter of `family`, its visual tokens from a fresh `GridStem`."""
    import transformers

    from xattn_cli.models.lxmert import LxmertAdapter
    from xattn_cli.models.visualbert import VisualBertAdapter

    spec = cfg["regions"]
    stem = GridStem(spec["stem"]["widths"], spec["cell"])
    labels = dict(id2label=dict(enumerate(answers)), label2id={a: i for i, a in enumerate(answers)})
    if family == "lxmert":
        config = transformers.LxmertConfig(**cfg["hf_config"], vocab_size=len(tokenizer),
                                           visual_feat_dim=stem.dim, num_qa_labels=len(answers), **labels)
        model, adapter_class = transformers.LxmertForQuestionAnswering(config), LxmertAdapter
    elif family == "visualbert":
        config = transformers.VisualBertConfig(**cfg["hf_config"], vocab_size=len(tokenizer),
                                               visual_embedding_dim=stem.dim, num_labels=len(answers), **labels)
        model, adapter_class = transformers.VisualBertForQuestionAnswering(config), VisualBertAdapter
    else:
        raise ValueError(f"no region VQA family {family!r} (lxmert or visualbert)")
    return adapter_class(model, tokenizer, StemGridRegions(stem, tuple(spec["grid"]), spec["cell"]),
                         name=f"shapes-{family}")
