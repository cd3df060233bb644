"""Explainers: an adapter (models/) + a method (methods/) + targets → maps, one `TargetMap` per target.

`build_relevancy` picks the relevancy explainer from what the adapter says it is (`adapter.layout.task`);
no code here or above asks for a model family.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from xattn_cli.errors import UsageError
from xattn_cli.methods import method_names

TASK_OPTIONS = {  # option → (what it is for, the tasks that take it)
    "text": ("CLIP models", {"image-text"}),
    "target": ("classifiers", {"classify"}),
    "start_layer": ("ViT and CLIP models", {"classify", "image-text"}),
    "precision": ("ViT and CLIP models (the others run in fp32)", {"classify", "image-text"}),
    "question": ("VQA models (LXMERT, VisualBERT, CATT)", {"vqa"}),
    "answer": ("VQA models (LXMERT, VisualBERT, CATT)", {"vqa"}),
    "features": ("region-feature models (LXMERT, VisualBERT, CATT)", {"vqa"}),
    "threshold": ("detection models (DETR)", {"detect"}),
    "residual": ("detection models (DETR)", {"detect"}),
}

RULE_OPTIONS = {  # option → (what it is for, the relevance rules of the models that take it)
    "dictionary": ("models with causal attention (CATT)", {"causal"}),
}

REQUIRED = {"image-text": "text", "vqa": "question"}  # task → the option it cannot run without


def spell_plainly(name: str) -> str:
    """An option's name as a library caller reads it in an error: `start layer`."""
    return name.replace("_", " ")


def check_options(adapter, method: str, given: dict[str, bool], spell: Callable[[str], str] = spell_plainly) -> None:
    """Usage errors for a method or options that a model's task does not take, and for what it cannot run
    without; `spell` writes an option's name as the caller's user knows it (the CLI: `--start-layer`)."""
    layout = getattr(adapter, "layout", None)
    if layout is None or "relevancy" not in layout.explainers:
        raise UsageError(f"{adapter.name} has no relevancy support")
    supported = method_names("relevancy", layout.rule)
    if method not in supported:
        raise UsageError(f"{adapter.name} supports {spell('method')} {', '.join(supported)}, not {method!r}")
    required = REQUIRED.get(layout.task)
    if required is not None and not given.get(required):
        raise UsageError(f"{adapter.name} needs {spell(required)}: give one or more")
    if layout.visual == "regions" and getattr(adapter, "regions", None) is None and not given.get("features"):
        raise UsageError(f"{adapter.name} has no region extractor of its own: give {spell('features')} (a .npz file)")
    for option, (purpose, tasks) in TASK_OPTIONS.items():
        if given.get(option) and layout.task not in tasks:
            takes = [name for name, (_, ts) in TASK_OPTIONS.items() if layout.task in ts]
            raise UsageError(f"{spell(option)} is for {purpose}; {adapter.name} takes {', '.join(map(spell, takes))}")
    for option, (purpose, rules) in RULE_OPTIONS.items():
        if given.get(option) and layout.rule not in rules:
            raise UsageError(f"{spell(option)} is for {purpose}; {adapter.name} is not one")


def build_relevancy(adapter, *, method: str, texts: Sequence[str] = (), targets: Sequence[str] = (),
                    start_layer: int | None = None, precision: str = "fp32", questions: Sequence[str] = (),
                    answer: str | None = None, features: str | Path | None = None, threshold: float | None = None,
                    residual: str | None = None, dictionary: str | Path | None = None,
                    spell: Callable[[str], str] = spell_plainly):
    """The relevancy explainer for the adapter's task; usage errors for options that do not apply, naming
    each option as `spell` writes it (the CLI: `--start-layer`).

    `features` (a .npz file, see `models.regions`) replaces a region model's own region extractor;
    `threshold` defaults to `detection.DEFAULT_THRESHOLD`; `residual` to "guarded". `dictionary` (a
    dictionary file, see `xattn_cli.dictionary`) replaces a causal-attention model's dictionary: this changes
    the model.
    """
    given = {"text": bool(texts), "target": bool(targets), "start_layer": start_layer is not None,
             "precision": precision != "fp32", "question": bool(questions), "answer": answer is not None,
             "features": features is not None, "threshold": threshold is not None, "residual": residual is not None,
             "dictionary": dictionary is not None}
    check_options(adapter, method, given, spell)
    if dictionary is not None:
        adapter.load_dictionary_file(dictionary)
    task = adapter.layout.task
    if task == "image-text":
        from xattn_cli.explainers.relevancy import ClipRelevancy

        return ClipRelevancy(adapter, texts, method=method, start_layer=start_layer, precision=precision)
    if task == "classify":
        from xattn_cli.explainers.relevancy import ClassifierRelevancy

        return ClassifierRelevancy(adapter, method=method, targets=targets, start_layer=start_layer,
                                   precision=precision)
    if task == "detect":
        from xattn_cli.explainers.detection import DEFAULT_THRESHOLD, DetectionRelevancy

        return DetectionRelevancy(adapter, threshold=DEFAULT_THRESHOLD if threshold is None else threshold,
                                  method=method, residual=residual or "guarded")
    from xattn_cli.explainers.vqa import VqaRelevancy
    from xattn_cli.models.regions import NpzRegions

    return VqaRelevancy(adapter, questions, answer=answer, regions=None if features is None else NpzRegions(features),
                        method=method)
