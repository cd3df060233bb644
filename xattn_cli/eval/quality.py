"""`xattn bench quality`: how faithful each method's maps are, against ground-truth masks.

Data: a dataset folder (DESIGN §5) or a generated held-out set of shapes-world scenes (seed 40 000, which
no training run or benchmark script uses): 2–4 objects, and in three quarters of the scenes two objects
share a colour or a shape (half by construction, more by chance), so that colour alone cannot win (DESIGN §7).
What each model explains (its `Task`, by the model's task):
- a CLIP model: each object's caption ("a red star") among the scene's captions;
- a classifier: each shape label present;
- a region VQA model: each question about one object ("what colour is the star?"), for the answer it gives;
- a detector: each detection (query and class, above the CLI's default threshold) that matches an object.
A target's ground truth is the union of the masks of the objects it names.

Every (model, method) gets the metrics of `eval.metrics` per target, then means with 95% bootstrap
intervals. `random` (iid noise) and `centre` (a Gaussian bump at the image centre) are floor baselines
that look at no model. Token masks (`mask`, measured on request: they optimise per target) are binary maps
of their kept patches, so their pointing is the share of the kept area inside the object (tied maxima
count in proportion) and perturbation removes the kept patches first, then the rest in index order.

The perturbation score is the classifier's probability of the target label (sigmoid for multi-label
models), the CLIP model's softmax probability of the target caption among all captions of the data
(prompt ensemble), the VQA model's probability of its answer, or the detector's probability of the
detection's class at its query, on the input with tokens removed: their patches blacked out (`pixels`, as
Chefer et al. zero pixels) or their keys masked in every attention layer that reads them (`attention`:
CLIP and ViT through `capture.TokenMask`, the CLS token kept, as `xattn mask` scores its kept and removed
patches; VQA models through their visual attention mask), which equals running the model on the kept
tokens alone. Tokens are the image patches, the VQA model's grid regions, or DETR's encoder cells;
detectors take `pixels` only (DETR's pixel mask also moves its position encoding).

Sanity (cascading randomisation, Adebayo et al. 2018): the blocks the image passes through (the vision
tower; LXMERT's vision and cross-modality layers; VisualBERT's joint layers; CATT's vision and fusion
layers; DETR's encoder and decoder; not the region stem or the detector's CNN backbone) are re-drawn from
the top, one more at each step (each parameter from a normal with the parameter's own mean and std), and
each method's token relevances for the same targets (the trained model's answers and detections) are
compared with those on the trained model by Spearman correlation. A method whose maps still correlate
≥ 0.5 once every block is random is flagged: its maps do not depend on what the model learned.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Callable, Hashable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from xattn_cli.capture import TokenMask
from xattn_cli.errors import ItemError, UsageError
from xattn_cli.eval import BASELINES, DEFAULT_SCENES, HELD_OUT_SEED, PERTURBATIONS
from xattn_cli.eval.metrics import (PERTURBATION_STEPS, bootstrap_ci, energy_in_mask, mean_threshold_miou,
                                    perturbation_auc, pointing, pool_to_tokens, remove_tokens, spearman)
from xattn_cli.io.images import load_image
from xattn_cli.methods import MAP_EXPLAINERS, MASK_EXPLAINERS, METHODS as REGISTRY, method_names
from xattn_cli.render import METRIC_LABELS
from xattn_cli.world.shapes import Scene, SceneObject, check_style, scene_at

SCENE_SIZE = 64  # the bundled models' input size
METHODS = (*method_names((*MAP_EXPLAINERS, *MASK_EXPLAINERS)), *BASELINES)
DEFAULT_METHODS = (*method_names(MAP_EXPLAINERS), *BASELINES)  # the token masks take ~100 model passes a target
METRICS = tuple(METRIC_LABELS)
CONFIDENCE = 0.95
SANITY_FLAG = 0.5  # mean Spearman with every block random at or above this: the maps ignore the model
RANDOM_MAP_SEED, SANITY_SEED = 7, 11
PROGRESS_EVERY = 25  # scenes between progress lines

Scenes = list[tuple[str, Scene]]  # (id, scene)


# --- data ------------------------------------------------------------------------------------------
def held_out_scenes(count: int, seed: int = HELD_OUT_SEED, style: str = "classic") -> Scenes:
    """Scenes 0..count−1 of the held-out stream drawn in world style `style`: 2, 3, 4, 2, ... objects, half forced
    to share a colour or a shape."""
    check_style(style)
    return [(f"{seed}-{index:06d}", scene_at(seed, index, size=SCENE_SIZE, n_objects=2 + index % 3, style=style))
            for index in range(count)]


def load_dataset(folder: str | Path) -> Scenes:
    """The scenes of a dataset folder (DESIGN §5). Raises UsageError naming the file and line at fault."""
    folder = Path(folder)
    annotations = folder / "annotations.jsonl"
    if not folder.is_dir():
        raise UsageError(f"dataset {folder}: no such folder")
    if not annotations.is_file():
        raise UsageError(f"dataset {folder}: no annotations.jsonl (a dataset folder as `xattn world export` writes)")
    scenes: Scenes = []
    with open(annotations, encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                scenes.append((str(record["id"]), _annotated_scene(folder, record)))
            except (ValueError, KeyError, TypeError, ItemError, OSError) as error:
                reason = f"missing key {error}" if isinstance(error, KeyError) else str(error).splitlines()[0]
                raise UsageError(f"{annotations}:{number}: {reason or type(error).__name__}") from None
    if not any(scene.objects for _, scene in scenes):
        raise UsageError(f"{annotations}: no annotated objects")
    return scenes


def _annotated_scene(folder: Path, record: dict) -> Scene:
    image = load_image(folder / record["image"])
    objects = []
    for entry in record["objects"]:
        mask = np.asarray(load_image(folder / entry["mask"]).convert("L")) > 127  # (H, W)
        if mask.shape != (image.height, image.width):
            raise ValueError(f"mask {entry['mask']} is {mask.shape[1]}x{mask.shape[0]}, "
                             f"its image {image.width}x{image.height}")
        objects.append(SceneObject(int(entry["k"]), str(entry["shape"]), str(entry["color"]),
                                   tuple(entry.get("box", (0, 0, 0, 0))), mask))
    return Scene(image, objects, list(record.get("captions", [])), list(record.get("qa", [])))


def scene_targets(scene: Scene, target_of: Callable[[SceneObject], str]) -> list[tuple[str, np.ndarray]]:
    """Each distinct target of the scene and the union of the masks of the objects it names."""
    masks: dict[str, np.ndarray] = {}
    for obj in scene.objects:
        name = target_of(obj)
        masks[name] = masks[name] | obj.mask if name in masks else obj.mask
    return list(masks.items())


# --- what each model task contributes ---------------------------------------------------------------
Target = Hashable  # what a task explains: a caption, a label, (question, answer), (query, class)


class Task:
    """One model as the benchmark sees it: its methods, its targets (each with its ground-truth mask), their
    maps, and per target a score of the model's input with tokens taken out.

    grid: the (rows, cols) tokens that tile the image: maps are pooled onto it and perturbation removes its cells.
    perturb: how a perturbation step takes tokens out, one of `perturbations`.
    sanity_streams: the attention streams whose blocks the sanity cascade randomises, in forward order.
    """

    perturbations: tuple[str, ...] = PERTURBATIONS
    sanity_streams: tuple[str, ...] = ("vision",)
    grid: tuple[int, int]

    def __init__(self, adapter, perturb: str = "pixels"):
        if perturb not in PERTURBATIONS:
            raise UsageError(f"unknown perturbation {perturb!r} (one of {', '.join(PERTURBATIONS)})")
        if perturb not in self.supports(adapter.layout):
            raise _unperturbable(adapter.name, perturb, self.supports(adapter.layout))
        self.adapter, self.perturb = adapter, perturb

    @classmethod
    def supports(cls, layout) -> tuple[str, ...]:
        """The perturbations this task can run on a model of `layout`."""
        return cls.perturbations

    @property
    def methods(self) -> tuple[str, ...]:
        """The registered methods this benchmark measures that the model's layout takes."""
        layout = self.adapter.layout
        measured = tuple(kind for kind in layout.explainers if kind in (*MAP_EXPLAINERS, *MASK_EXPLAINERS))
        return tuple(method_names(measured, layout.rule))

    def targets(self, scene: Scene) -> list[tuple[Target, np.ndarray]]:
        """Each target of the scene and its (H, W) bool ground-truth mask."""
        raise NotImplementedError

    def maps(self, method: str, image: Image.Image, targets: list[Target]) -> list[np.ndarray]:
        """One (H, W) map per target."""
        raise NotImplementedError

    def scorers(self, image: Image.Image, targets: list[Target]) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        """Per target: (S, N) keep masks over the grid's tokens → (S,) its score with the removed tokens taken out."""
        raise NotImplementedError


class PatchTask(Task):
    """A model that reads the image as patches (CLIP, ViT): targets named by the objects (`target_of`), tokens
    are the patches, `pixels` blacks them out and `attention` masks their keys in every layer of the vision
    tower (CLS kept)."""

    def __init__(self, adapter, perturb: str = "pixels"):
        super().__init__(adapter, perturb)
        height, width = adapter.native_size
        self.grid = (height // adapter.patch_size[0], width // adapter.patch_size[1])
        self.fill = -torch.tensor(adapter.mean) / torch.tensor(adapter.std)  # (3,) black after normalising

    @classmethod
    def supports(cls, layout) -> tuple[str, ...]:
        return PERTURBATIONS if set(MASK_EXPLAINERS) & set(layout.explainers) else ("pixels",)

    @staticmethod
    def target_of(obj: SceneObject) -> str:
        raise NotImplementedError

    def targets(self, scene: Scene) -> list[tuple[Target, np.ndarray]]:
        return scene_targets(scene, self.target_of)

    def explainer(self, method: str, targets: list[str]):
        """The explainer that runs `method` for these targets."""
        raise NotImplementedError

    def maps(self, method: str, image: Image.Image, targets: list[Target]) -> list[np.ndarray]:
        return [target.map for target in self.explainer(method, targets).explain([image])[0]]

    def outputs(self, pixels: torch.Tensor) -> torch.Tensor:
        """(S, 3, H, W) inputs → (S, ...) what the model gives: logits, or normalised image embeddings."""
        raise NotImplementedError

    def probabilities(self, outputs: torch.Tensor) -> torch.Tensor:
        """`outputs` of S inputs → (S, C) probabilities over the model's targets."""
        raise NotImplementedError

    def index(self, target: str) -> int:
        raise NotImplementedError

    def perturbed_outputs(self, pixels: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """`outputs` of the (3, H, W) input once per row of `keep` (S, N) bool, the removed tokens taken out."""
        if self.perturb == "pixels":
            return self.outputs(remove_tokens(pixels, keep, self.grid, self.fill.to(pixels.device)))  # (S, ...)
        prefix = self.adapter.layout.prefix_tokens
        kept = torch.cat([keep.new_ones(len(keep), prefix), keep], dim=1).to(pixels.dtype)  # (S, prefix + N)
        sites = [site for site in self.adapter.attention_sites() if site.stream == "vision"]
        with TokenMask(sites, kept, prefix=prefix):
            return self.outputs(pixels.expand(len(keep), *pixels.shape))  # (S, ...)

    def scorers(self, image: Image.Image, targets: list[Target]) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        """Per target: its probability (`probabilities`) with the removed tokens taken out."""
        pixels = self.adapter.preprocess([image], self.adapter.native_size)[0]  # (3, H, W)

        def scorer(column: int) -> Callable[[torch.Tensor], torch.Tensor]:
            @torch.inference_mode()
            def score(keep: torch.Tensor) -> torch.Tensor:
                outputs = self.perturbed_outputs(pixels, keep.to(pixels.device))
                return self.probabilities(outputs)[:, column].float().cpu()  # (S,)

            return memoised(score)

        return [scorer(self.index(target)) for target in targets]


def memoised(score: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """`score` that runs the model once per distinct keep mask: the first and last steps are the same for
    every method and direction, and methods that rank tokens alike share all their rows."""
    cache: dict[bytes, float] = {}

    def cached(keep: torch.Tensor) -> torch.Tensor:
        keys = [row.numpy().tobytes() for row in keep]  # keep: (S, N) bool on the CPU
        new = {key: row for key, row in zip(keys, keep) if key not in cache}
        if new:
            cache.update(zip(new, score(torch.stack(list(new.values()))).tolist()))
        return torch.tensor([cache[key] for key in keys])  # (S,)

    return cached


class ClipTask(PatchTask):
    def __init__(self, adapter, targets: Iterable[str], perturb: str = "pixels"):
        super().__init__(adapter, perturb)
        self.vocabulary = sorted(targets)
        self.text_features = adapter.text_embeddings(self.vocabulary)  # (C, E), normalised

    @staticmethod
    def target_of(obj: SceneObject) -> str:
        return obj.caption

    def explainer(self, method: str, targets: list[str]):
        from xattn_cli.explainers.mask import MaskExplainer
        from xattn_cli.explainers.relevancy import ClipRelevancy
        from xattn_cli.explainers.surgery import SurgeryExplainer

        kind = REGISTRY[method].explainer
        if kind == "surgery":
            return SurgeryExplainer(self.adapter, targets)
        if kind == "mask":
            return MaskExplainer(self.adapter, texts=targets)
        return ClipRelevancy(self.adapter, targets, method=method)

    def outputs(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.adapter.encode_image(pixels), dim=-1)  # (S, E)

    def probabilities(self, outputs: torch.Tensor) -> torch.Tensor:
        return (self.adapter.logit_scale * outputs @ self.text_features.T).softmax(dim=-1)  # (S, C)

    def index(self, target: str) -> int:
        return self.vocabulary.index(target)


class ClassifierTask(PatchTask):
    def __init__(self, adapter, targets: Iterable[str], perturb: str = "pixels"):
        super().__init__(adapter, perturb)
        for target in targets:
            adapter.target_index(target)  # a label the model lacks is a usage error, before any work

    @staticmethod
    def target_of(obj: SceneObject) -> str:
        return obj.shape

    def explainer(self, method: str, targets: list[str]):
        from xattn_cli.explainers.mask import MaskExplainer
        from xattn_cli.explainers.relevancy import ClassifierRelevancy

        if REGISTRY[method].explainer == "mask":
            return MaskExplainer(self.adapter, targets=targets)
        return ClassifierRelevancy(self.adapter, method=method, targets=targets)

    def outputs(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.adapter.classify(pixels)  # (S, C) logits

    def probabilities(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs.sigmoid() if self.adapter.multi_label else outputs.softmax(dim=-1)

    def index(self, target: str) -> int:
        return self.adapter.target_index(target)


class VqaTask(Task):
    """A region-feature VQA model (LXMERT, VisualBERT, CATT) over grid regions: each question of the scene about
    one object ("what colour is the star?"), explained for the answer the model gives on the whole image; the
    object's mask is the ground truth. Score: the probability of that answer. Tokens are the grid's regions:
    `pixels` blacks out their cells and recomputes the region features, `attention` takes them out of the
    visual attention mask (their keys masked in every layer that reads regions)."""

    sanity_streams = ("vision", "joint", "text->vision")  # the regions' own layers, then where questions read them

    def __init__(self, adapter, perturb: str = "pixels"):
        super().__init__(adapter, perturb)
        if getattr(adapter.regions, "grid", None) is None:
            raise UsageError(f"{adapter.name}: bench quality needs grid regions computed from the image")
        self.grid = tuple(adapter.regions.grid)

    def targets(self, scene: Scene) -> list[tuple[Target, np.ndarray]]:
        about_one = [qa for qa in scene.qa if qa.get("object") is not None]
        if not about_one:
            return []
        masks = {obj.k: obj.mask for obj in scene.objects}
        questions = [qa["question"] for qa in about_one]
        with torch.inference_mode():
            regions = self.adapter.regions([scene.image]).to(self.adapter.device)
            logits = self.adapter.answer_logits(self.adapter.tokenize(questions), regions.repeat(len(questions)))
        answers = logits.argmax(dim=-1).tolist()  # (Q,)
        return [((question, answer), masks[qa["object"]])
                for question, answer, qa in zip(questions, answers, about_one)]

    def maps(self, method: str, image: Image.Image, targets: list[Target]) -> list[np.ndarray]:
        from xattn_cli.explainers.vqa import VqaRelevancy

        return [VqaRelevancy(self.adapter, [question], answer=self.adapter.answers[answer], method=method)
                .explain([image])[0][0].map for question, answer in targets]

    def scorers(self, image: Image.Image, targets: list[Target]) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        adapter = self.adapter
        with torch.inference_mode():
            whole = adapter.regions([image]).to(adapter.device)
        rgb = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float()  # (3, H, W) in 0..255

        def perturbed(keep: torch.Tensor):
            if self.perturb == "attention":
                return whole.repeat(len(keep), keep)
            blacked = remove_tokens(rgb, keep, self.grid, torch.zeros(3)).round().byte()  # (S, 3, H, W)
            images = [Image.fromarray(array.permute(1, 2, 0).numpy()) for array in blacked]
            return adapter.regions(images).to(adapter.device)

        def scorer(question: str, answer: int) -> Callable[[torch.Tensor], torch.Tensor]:
            tokens = adapter.tokenize([question])

            @torch.inference_mode()
            def score(keep: torch.Tensor) -> torch.Tensor:
                batch = {key: value.expand(len(keep), -1) for key, value in tokens.items()}
                return adapter.answer_logits(batch, perturbed(keep)).softmax(dim=-1)[:, answer].float().cpu()  # (S,)

            return memoised(score)

        return [scorer(question, answer) for question, answer in targets]


class DetectionTask(Task):
    """DETR: each detection above the CLI's default threshold on the whole image that matches a ground-truth
    object of its class (IoU ≥ 0.5, most probable detection first; the object's mask is the ground truth),
    explained for its query and class. Score: that query's probability of that class. Tokens are the
    encoder's image cells; `pixels` blacks out their patches. Attention masks are refused: DETR's pixel mask
    also moves its sine position encoding."""

    perturbations = ("pixels",)
    sanity_streams = ("encoder", "decoder")
    match_iou = 0.5

    def __init__(self, adapter, perturb: str = "pixels"):
        from xattn_cli.explainers.detection import DetectionRelevancy
        from xattn_cli.models.detr import feature_grid

        super().__init__(adapter, perturb)
        height, width = adapter.native_size
        blank = adapter.preprocess([Image.new("RGB", (width, height))], adapter.native_size)
        if not isinstance(blank, torch.Tensor):
            raise UsageError(f"{adapter.name}: bench quality needs a DETR that squashes images to one size")
        with DetectionRelevancy(adapter, method="raw").recording() as recording:
            adapter.detect(blank)
        self.grid = feature_grid((height, width), recording.select("self", "encoder")[0].probs.shape[-1])
        self.fill = -torch.tensor(adapter.mean) / torch.tensor(adapter.std)  # (3,) black after normalising

    def targets(self, scene: Scene) -> list[tuple[Target, np.ndarray]]:
        from xattn_cli.eval.detection import box_iou
        from xattn_cli.explainers.detection import DetectionRelevancy
        from xattn_cli.models.detr import boxes_to_pixels

        adapter, image = self.adapter, scene.image
        with torch.inference_mode():
            logits, boxes = adapter.detect(adapter.preprocess([image], adapter.native_size))  # (1, Q, C + 1), (1, Q, 4)
        free = list(scene.objects)
        targets = []
        for query, label, _ in DetectionRelevancy(adapter).detections(logits.float())[0]:  # most probable first
            box = boxes_to_pixels(boxes[0, query].float().cpu(), (image.height, image.width)).tolist()
            same = [obj for obj in free if obj.shape == adapter.labels[label]]
            overlaps = box_iou(box, np.array([obj.box for obj in same], dtype=np.float64).reshape(-1, 4))
            if len(same) and overlaps.max() >= self.match_iou:
                matched = same[int(overlaps.argmax())]
                free.remove(matched)
                targets.append(((query, label), matched.mask))
        return targets

    def maps(self, method: str, image: Image.Image, targets: list[Target]) -> list[np.ndarray]:
        from xattn_cli.explainers.detection import DetectionRelevancy

        explainer = DetectionRelevancy(self.adapter, method=method, queries=list(targets))
        return [target.map for target in explainer.explain([image])[0]]

    def scorers(self, image: Image.Image, targets: list[Target]) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        pixels = self.adapter.preprocess([image], self.adapter.native_size)[0]  # (3, H, W)

        def scorer(query: int, label: int) -> Callable[[torch.Tensor], torch.Tensor]:
            @torch.inference_mode()
            def score(keep: torch.Tensor) -> torch.Tensor:
                inputs = remove_tokens(pixels, keep.to(pixels.device), self.grid, self.fill.to(pixels.device))
                logits, _ = self.adapter.detect(inputs)  # (S, Q, C + 1)
                return logits.float().softmax(dim=-1)[:, query, label].cpu()  # (S,)

            return memoised(score)

        return [scorer(query, label) for query, label in targets]


TASKS: dict[str, type[Task]] = {"image-text": ClipTask, "classify": ClassifierTask, "vqa": VqaTask,
                                "detect": DetectionTask}  # by `Layout.task`


def task_for(adapter, scenes: Scenes, perturb: str = "pixels") -> Task:
    kind = TASKS.get(adapter.layout.task)
    if kind is None:
        raise _unsupported(adapter.name, adapter.layout.task)
    if issubclass(kind, PatchTask):  # their targets are named by objects: the data's names, checked up front
        return kind(adapter, {kind.target_of(obj) for _, scene in scenes for obj in scene.objects}, perturb)
    return kind(adapter, perturb)


def _unsupported(model: str, task: str) -> UsageError:
    return UsageError(f"{model} ({task}) has no quality benchmark yet (tasks: {', '.join(TASKS)})")


def _unperturbable(model: str, perturb: str, supported: Sequence[str]) -> UsageError:
    return UsageError(f"{model} takes no {perturb} perturbation; use --perturb {' or '.join(supported)}")


# --- maps ----------------------------------------------------------------------------------------------
def random_map(size: tuple[int, int], seed: Sequence[int]) -> np.ndarray:
    """iid uniform noise, (H, W) for an image of `size` (W, H)."""
    width, height = size
    return np.random.default_rng(list(seed)).random((height, width), dtype=np.float32)


def centre_map(size: tuple[int, int]) -> np.ndarray:
    """A Gaussian bump at the image centre, σ a quarter of each side; (H, W) for `size` (W, H)."""
    width, height = size
    rows = (np.arange(height) + 0.5 - height / 2) / (height / 4)  # (H,)
    cols = (np.arange(width) + 0.5 - width / 2) / (width / 4)  # (W,)
    return np.exp(-(rows[:, None] ** 2 + cols[None, :] ** 2) / 2).astype(np.float32)  # (H, W)


def method_maps(task: Task, method: str, scene: Scene, targets: list[str], scene_index: int) -> list[np.ndarray]:
    """One (H, W) map per target: the method's, or a baseline's."""
    if method == "random":
        return [random_map(scene.image.size, (RANDOM_MAP_SEED, scene_index, k)) for k in range(len(targets))]
    if method == "centre":
        return [centre_map(scene.image.size)] * len(targets)
    return task.maps(method, scene.image, targets)


# --- the run -------------------------------------------------------------------------------------------
def target_metrics(heatmap: np.ndarray, mask: np.ndarray, grid: tuple[int, int],
                   score: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
    relevance = pool_to_tokens(heatmap, grid)  # (N,)
    return {"pointing": pointing(heatmap, mask), "miou": mean_threshold_miou(heatmap, mask),
            "energy": energy_in_mask(heatmap, mask),
            "auc_positive": perturbation_auc(relevance, score, most_relevant_first=True),
            "auc_negative": perturbation_auc(relevance, score, most_relevant_first=False)}


def evaluate(task: Task, scenes: Scenes, methods: Sequence[str],
             progress: Callable[[int], None] = lambda index: None) -> dict[str, dict[str, list[float]]]:
    """Per method, per metric: one value per target of every scene. `progress(i)` as scene i starts."""
    values = {method: {metric: [] for metric in METRICS} for method in methods}
    for index, (_, scene) in enumerate(scenes):
        progress(index)
        targets = task.targets(scene)
        if not targets:
            continue
        names = [name for name, _ in targets]
        scorers = task.scorers(scene.image, names)
        for method in methods:
            for (_, mask), score, heatmap in zip(targets, scorers, method_maps(task, method, scene, names, index)):
                for metric, value in target_metrics(heatmap, mask, task.grid, score).items():
                    values[method][metric].append(value)
    return values


def summarise(values: dict[str, list[float]], resamples: int) -> dict:
    """Mean and bootstrap interval of each metric."""
    summary: dict = {"targets": len(values[METRICS[0]])}
    for metric, sample in values.items():
        low, high = bootstrap_ci(sample, resamples, CONFIDENCE)
        summary[metric] = {"mean": float(np.mean(sample)), "low": low, "high": high}
    return summary


def token_relevances(task: Task, method: str, scenes: Scenes, targets: list[list[Target]]) -> list[torch.Tensor]:
    """(N,) token relevance of every target of every scene (`targets[i]`: scene i's), in order."""
    relevances = []
    for index, ((_, scene), names) in enumerate(zip(scenes, targets)):
        if names:
            relevances += [pool_to_tokens(m, task.grid) for m in method_maps(task, method, scene, names, index)]
    return relevances


def sanity_blocks(adapter, streams: Sequence[str] = ("vision",)) -> list[torch.nn.Module]:
    """The blocks that hold the attention sites of `streams`, bottom first (streams in the order given, layers
    in order within each): the `ModuleList` entries that hold those sites, each once."""
    sites = [site for stream in streams for site in sorted(
        (s for s in adapter.attention_sites() if s.stream == stream), key=lambda s: s.layer)]
    entries = [child for module in adapter.model.modules() if isinstance(module, torch.nn.ModuleList)
               for child in module]
    blocks = [next(entry for entry in entries if any(m is site.module for m in entry.modules())) for site in sites]
    return list({id(block): block for block in blocks}.values())


@torch.no_grad()
def randomise(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Re-draw every parameter from a normal with that parameter's own mean and standard deviation."""
    for parameter in module.parameters():
        noise = torch.randn(parameter.shape, generator=generator).to(parameter.device, parameter.dtype)
        parameter.copy_(noise * parameter.std(correction=0) + parameter.mean())


def sanity_cascade(task: Task, scenes: Scenes, methods: Sequence[str]) -> dict[str, list[float]]:
    """Per method: the mean Spearman correlation with the trained model's token relevances after the top
    1, 2, ..., L blocks of the task's `sanity_streams` are randomised, for the same targets (those the trained
    model gives). The model is restored afterwards."""
    targets = [[name for name, _ in task.targets(scene)] for _, scene in scenes]
    original = {method: token_relevances(task, method, scenes, targets) for method in methods}
    model = task.adapter.model
    saved = copy.deepcopy(model.state_dict())
    generator = torch.Generator().manual_seed(SANITY_SEED)
    curves: dict[str, list[float]] = {method: [] for method in methods}
    try:
        for block in reversed(sanity_blocks(task.adapter, task.sanity_streams)):
            randomise(block, generator)
            for method in methods:
                after = token_relevances(task, method, scenes, targets)
                curves[method].append(float(np.mean([spearman(a, b) for a, b in zip(original[method], after)])))
    finally:
        model.load_state_dict(saved)
    return curves


def check_names(models: Sequence[str], methods: Sequence[str], perturb: str = "pixels") -> None:
    """Unknown models, methods or perturbations, and models whose task the benchmark lacks, are usage errors
    before any work."""
    from xattn_cli.models.registry import resolve

    if perturb not in PERTURBATIONS:
        raise UsageError(f"unknown perturbation {perturb!r} (one of {', '.join(PERTURBATIONS)})")
    if not models:
        raise UsageError("no bundled model with weights to measure; name the models to measure")
    unknown = [method for method in methods if method not in METHODS]
    if unknown:
        raise UsageError(f"unknown method {unknown[0]!r} (one of {', '.join(METHODS)})")
    for name in models:
        spec, _ = resolve(name)
        if spec.layout is None:  # "auto": known once loaded
            continue
        if spec.layout.task not in TASKS:
            raise _unsupported(name, spec.layout.task)
        supported = TASKS[spec.layout.task].supports(spec.layout)
        if perturb not in supported:
            raise _unperturbable(name, perturb, supported)


def default_models(perturb: str = "pixels") -> list[str]:
    """Every bundled model with weights present whose task the benchmark knows and can perturb so."""
    from xattn_cli.models.registry import list_models

    return [spec.name for spec in list_models() if spec.bundled and spec.layout.task in TASKS
            and perturb in TASKS[spec.layout.task].supports(spec.layout) and spec.weights_available()]


def run_quality(models: Sequence[str], methods: Sequence[str], *, data: str | Path | None = None,
                scenes: int = DEFAULT_SCENES, seed: int = HELD_OUT_SEED, style: str = "classic",
                perturb: str = "pixels", device: str = "cpu", resamples: int = 1000, sanity_scenes: int = 0,
                log: Callable[[str], None] = lambda line: None) -> dict:
    """The whole benchmark as a JSON-ready dict (see `format_tables` for the columns).

    Args:
        data: a dataset folder; None generates `scenes` held-out scenes of stream `seed` in world style `style`.
        perturb: how perturbation takes tokens out, "pixels" or "attention" (see the module docstring).
        sanity_scenes: with N > 0, also the randomisation cascade on the first N scenes.
    Methods that do not apply to a model (surgery on a classifier) are skipped for it, with a log line.
    Raises UsageError for unknown names and bad data, before any model runs.
    """
    from xattn_cli import __version__
    from xattn_cli.models.registry import load_model

    check_names(models, methods, perturb)
    if data is not None and style != "classic":
        raise UsageError("--style draws generated scenes; a dataset folder is drawn already (export it with --style)")
    started = time.perf_counter()
    scene_list = load_dataset(data) if data is not None else held_out_scenes(scenes, seed, style)
    rows, sanity = [], []
    for name in models:
        task = task_for(load_model(name, device=device), scene_list, perturb)
        chosen = [method for method in methods if method in task.methods or method in BASELINES]
        skipped = [method for method in methods if method not in chosen]
        if skipped:
            log(f"{name}: skipped {', '.join(skipped)} (not available for this model)")
        model_started = time.perf_counter()

        def progress(index: int) -> None:
            if index % PROGRESS_EVERY == 0:
                log(f"{name}: scene {index + 1}/{len(scene_list)}")

        values = evaluate(task, scene_list, chosen, progress)
        rows += [{"model": name, "method": method, **summarise(values[method], resamples)} for method in chosen]
        log(f"{name}: {len(chosen)} methods on {len(scene_list)} scenes in {time.perf_counter() - model_started:.0f} s")
        if sanity_scenes:
            sanity_started = time.perf_counter()
            curves = sanity_cascade(task, scene_list[:sanity_scenes], chosen)
            log(f"{name}: sanity cascade in {time.perf_counter() - sanity_started:.0f} s")
            sanity += [{"model": name, "method": method, "spearman": curve, "flagged": curve[-1] >= SANITY_FLAG}
                       for method, curve in curves.items()]
    source = str(data) if data is not None else f"held-out shapes world, seed {seed}" + (
        f", style {style}" if style != "classic" else "")
    return {"benchmark": "quality", "xattn": __version__, "data": source, "scenes": len(scene_list),
            "steps": list(PERTURBATION_STEPS), "perturb": perturb, "resamples": resamples, "confidence": CONFIDENCE,
            "rows": rows, "sanity": {"scenes": min(sanity_scenes, len(scene_list)), "flag_at": SANITY_FLAG,
                                     "rows": sanity} if sanity_scenes else None,
            "elapsed_s": round(time.perf_counter() - started, 1)}


# --- tables --------------------------------------------------------------------------------------------
def format_tables(result: dict) -> str:
    """Markdown: one row per (model, method), `mean [low, high]` per metric; then the sanity table."""
    lines = ["| model | method | targets | " + " | ".join(METRIC_LABELS[m] for m in METRICS) + " |",
             "| --- | --- | ---: |" + " --- |" * len(METRICS)]
    for row in result["rows"]:
        cells = [f"{row[m]['mean']:.3f} [{row[m]['low']:.3f}, {row[m]['high']:.3f}]" for m in METRICS]
        lines.append(f"| {row['model']} | {row['method']} | {row['targets']} | " + " | ".join(cells) + " |")
    if result.get("sanity"):
        sanity = result["sanity"]
        lines += ["", f"Sanity: Spearman ρ with the trained model's maps after randomising the top 1, 2, … blocks "
                      f"({sanity['scenes']} scenes); flagged when ρ ≥ {sanity['flag_at']} with all random.", "",
                  "| model | method | ρ by blocks randomised | flagged |", "| --- | --- | --- | --- |"]
        for row in sanity["rows"]:
            curve = ", ".join(f"{value:.2f}" for value in row["spearman"])
            lines.append(f"| {row['model']} | {row['method']} | {curve} | {'FLAGGED' if row['flagged'] else 'ok'} |")
    return "\n".join(lines)
