"""Explanation methods: pure functions of tensors (no I/O, no model-family knowledge), and `METHODS`, the one
registry of method names from which the CLI choices, `bench` lists and help text are built.

Imports allowed here: `xattn_cli.tensors` and `xattn_cli.capture` (the recorded events). Never models, io,
explainers or cli. This module itself imports no torch, so the CLI can build its help from it.
"""
from __future__ import annotations

from dataclasses import dataclass

from xattn_cli.errors import UsageError

RULES = ("self", "bimodal", "joint", "encoder-decoder", "causal")
"""How relevance propagates through a model's attention (an adapter's `layout.rule`): `self` per stream
(ViT, CLIP towers), `bimodal` two streams with cross attention (LXMERT), `joint` one stream over words and
regions (VisualBERT), `encoder-decoder` (DETR), `causal` question, regions and dictionary entries through
causal attention (CATT, `methods/causal.py`; no model uses it yet)."""

RESIDUAL_RULES = ("guarded", "official")
"""Eqs. 8+9 on a row of R − I that sums to zero: `guarded` leaves it at zero (R̄ row = identity row);
`official` divides 0 by 0 as the official code does (NaN)."""


@dataclass(frozen=True)
class MethodSpec:
    name: str
    explainer: str  # the command that runs it: "surgery", "relevancy" or "mask"
    needs_gradients: bool
    last_layer_only: bool  # reads one attention layer, the last, instead of every layer from the start layer
    rules: tuple[str, ...]  # the attention layouts it applies to (empty: any its command takes, e.g. surgery)
    summary: str


METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in (
    MethodSpec("surgery", "surgery", False, False, (),
               "CLIP Surgery: v-v attention and feature surgery (Li et al., 2023)"),
    MethodSpec("chefer", "relevancy", True, False, RULES,
               "gradient-weighted relevancy propagation (Chefer et al., ICCV 2021)"),
    MethodSpec("rollout", "relevancy", False, False, ("self",),
               "attention rollout (Abnar & Zuidema, 2020); its co-attention versions disagree, so self only"),
    MethodSpec("raw", "relevancy", False, True, RULES, "the last layer's attention, mean over heads"),
    MethodSpec("attn-gradcam", "relevancy", True, True, RULES, "Grad-CAM over the last layer's attention heads"),
    MethodSpec("mask", "mask", True, False, ("self",),
               "learned token masks: the patches of a fixed budget that keep the decision (after MEAT, CVPR 2022)"),
)}

MAP_EXPLAINERS = ("surgery", "relevancy")
"""The commands whose methods give graded maps: what `bench perf` times and `bench quality` measures by default."""

MASK_EXPLAINERS = ("mask",)
"""The commands whose methods give binary maps (a fixed budget of kept patches, optimised per target);
`bench quality` measures them on request."""


def method_names(explainer: str | tuple[str, ...] | None = None, rule: str | None = None) -> list[str]:
    """Registered methods, optionally only those one command (or any of several) runs and one relevance rule
    supports."""
    commands = (explainer,) if isinstance(explainer, str) else explainer
    return [spec.name for spec in METHODS.values()
            if (commands is None or spec.explainer in commands)
            and (rule is None or not spec.rules or rule in spec.rules)]


def method_spec(name: str, rule: str | None = None, model: str = "") -> MethodSpec:
    """The spec of `name`; a usage error when unknown, or when the model's relevance `rule` does not take it."""
    if name not in METHODS:
        raise UsageError(f"unknown method {name!r} (one of {', '.join(METHODS)})")
    spec = METHODS[name]
    if rule is not None and spec.explainer == "relevancy" and rule not in spec.rules:
        supported = ", ".join(method_names("relevancy", rule))
        raise UsageError(f"{model or 'this model'} supports method {supported}, not {name!r}")
    return spec
