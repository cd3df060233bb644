"""`AttentionRecorder`: post-softmax attention of every layer, per head, and its gradient.

Adapters name the attention modules (`AttentionSite`s); the recorder switches each to a path that
materialises its probabilities, records them, and attaches a tensor hook for the gradient (a tensor hook
rather than a module backward hook: pytorch#61519). Everything is undone in `finally`, exceptions are
never swallowed, and the recorded tensor is the one that multiplies V, so its gradient is the one the
relevancy rules need.
"""
from __future__ import annotations

import functools
import itertools
import sys
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from xattn_cli.nn.masked_attention import masked_softmax
from xattn_cli.tensors import merge_heads, split_heads


@dataclass
class AttentionEvent:
    kind: str  # "self" or "cross"
    stream: str  # vision, text, joint, encoder, decoder; cross: "text->vision" (queries -> keys)
    layer: int
    probs: torch.Tensor  # (B, heads, Nq, Nk), detached
    grad: torch.Tensor | None = None  # same shape, after backward()


@dataclass
class Recording:
    events: list[AttentionEvent] = field(default_factory=list)

    def select(self, kind: str | None = None, stream: str | None = None) -> list[AttentionEvent]:
        """Events of one kind/stream, in layer order."""
        chosen = [e for e in self.events if (kind is None or e.kind == kind) and (stream is None or e.stream == stream)]
        return sorted(chosen, key=lambda e: e.layer)

    def drop(self, stream: str) -> None:
        """Forget one stream's events (before that tower runs again for the next target)."""
        self.events[:] = [e for e in self.events if e.stream != stream]


@dataclass(frozen=True)
class AttentionSite:
    """One attention module, how to tag its events, and how to make it report probabilities.

    backend "hf": `module` is a transformers attention module (its config selects the attention function);
    "timm": a timm `Attention`; "mha": the module that holds an `nn.MultiheadAttention` as `attribute`;
    "dropout": a module whose probabilities always pass through its dropout submodule `attribute` on their
    way to V (HF LXMERT and VisualBERT attention, `xattn_cli.nn.CrossAttention`).
    A module that runs more than once per forward (LXMERT's cross-attention serves both directions) gets one
    site per call, listed in call order: its k-th call is recorded by its k-th site, cyclically.
    """

    module: torch.nn.Module
    kind: str
    stream: str
    layer: int
    backend: str
    attribute: str = "attn"


# --- backends ------------------------------------------------------------------------------------
_HF_IMPLEMENTATION = "xattn_record"
_HF_SITES: "weakref.WeakKeyDictionary[torch.nn.Module, Callable[[torch.Tensor], None]]" = weakref.WeakKeyDictionary()
_HF_MASKS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[torch.Tensor, int]]" = weakref.WeakKeyDictionary()
"""Modules under a `TokenMask`: (keep (B, Nk), prefix tokens)."""


def _hf_masked_attention(module, query, key, value, attention_mask, keep: torch.Tensor, prefix: int,
                         scaling: float | None = None, dropout: float = 0.0, **_):
    """Eager attention with Ψ (`masked_softmax`) for softmax, in float32 at least (float64 stays float64)."""
    scores = query @ key.transpose(-2, -1) * (query.shape[-1] ** -0.5 if scaling is None else scaling)  # (B, H, Nq, Nk)
    if attention_mask is not None:
        scores = scores + attention_mask
    dtype = torch.promote_types(scores.dtype, torch.float32)
    probs = masked_softmax(scores.to(dtype), keep, prefix).to(query.dtype)  # (B, H, Nq, Nk)
    probs = F.dropout(probs, p=dropout, training=module.training)
    return (probs @ value).transpose(1, 2).contiguous(), probs  # (B, Nq, H, d)


def _hf_recording_attention(module, query, key, value, attention_mask, **kwargs):
    """The model's own eager attention (Ψ under a `TokenMask`), reporting the probabilities that multiply V."""
    mask = _HF_MASKS.get(module)
    if mask is None:
        eager = sys.modules[type(module).__module__].eager_attention_forward
        output, probs = eager(module, query, key, value, attention_mask, **kwargs)
    else:
        output, probs = _hf_masked_attention(module, query, key, value, attention_mask, *mask, **kwargs)
    record = _HF_SITES.get(module)
    if record is not None:
        record(probs)
    return output, probs


@functools.cache
def _register_hf_backend() -> None:
    """Register our attention function, and eager's mask builder under the same name (transformers ≥ 4.53
    looks masks up by implementation name and would otherwise build no causal or padding mask)."""
    from transformers import AttentionInterface

    AttentionInterface.register(_HF_IMPLEMENTATION, _hf_recording_attention)
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    except ImportError:  # older transformers build masks inside each model
        return
    ALL_MASK_ATTENTION_FUNCTIONS.register(_HF_IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS["eager"])


def use_hf_backend(module: torch.nn.Module) -> Callable[[], None]:
    """Switch the config of a HF attention module to our attention function; returns the undo."""
    _register_hf_backend()
    config = module.config
    previous = config._attn_implementation
    config._attn_implementation_internal = _HF_IMPLEMENTATION
    return lambda: setattr(config, "_attn_implementation_internal", previous)


class _RecordingMultiheadAttention(torch.nn.Module):
    """Stands in for an `nn.MultiheadAttention` (batch_first or not) and reports per-head probabilities to each
    of `records`; with `mask` = (keep (B, Nk), prefix tokens) set, its softmax is Ψ (`masked_softmax`)."""

    def __init__(self, original: torch.nn.MultiheadAttention):
        super().__init__()
        self.original = original
        self.records: list[Callable[[torch.Tensor], None]] = []
        self.mask: tuple[torch.Tensor, int] | None = None
        self.batch_first = original.batch_first

    def forward(self, query, key, value, need_weights=False, attn_mask=None, key_padding_mask=None, **_):
        mha = self.original
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))  # (B, n, D)
        weight, bias = mha.in_proj_weight, mha.in_proj_bias
        width = mha.embed_dim
        q = split_heads(F.linear(query, weight[:width], bias[:width]), mha.num_heads)  # (B, H, Nq, d)
        k = split_heads(F.linear(key, weight[width : 2 * width], bias[width : 2 * width]), mha.num_heads)
        v = split_heads(F.linear(value, weight[2 * width :], bias[2 * width :]), mha.num_heads)  # (B, H, Nk, d)
        scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5  # (B, H, Nq, Nk)
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                attn_mask = torch.zeros_like(attn_mask, dtype=scores.dtype).masked_fill(attn_mask, float("-inf"))
            if attn_mask.dim() == 3:  # (B·H, Nq, Nk)
                attn_mask = attn_mask.view(scores.shape)
            scores = scores + attn_mask
        if key_padding_mask is not None:
            scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        probs = scores.softmax(dim=-1) if self.mask is None else masked_softmax(scores, *self.mask)  # (B, H, Nq, Nk)
        for record in self.records:
            record(probs)
        output = mha.out_proj(merge_heads(probs @ v))  # (B, Nq, D)
        if not self.batch_first:
            output = output.transpose(0, 1)
        return output, (probs if need_weights else None)


# --- the recorder ---------------------------------------------------------------------------------
class AttentionRecorder:
    """Context manager: `with AttentionRecorder(sites) as recording: loss.backward()`.

    After the block, `recording.events` hold probabilities and gradients, and the model is as it was.
    """

    def __init__(self, sites: list[AttentionSite]):
        if not sites:
            raise ValueError("no attention sites to record")
        self.sites = sites
        self.recording = Recording()
        self._undo: list[Callable[[], None]] = []

    def _recorder_for(self, site: AttentionSite) -> Callable[[torch.Tensor], None]:
        def record(probs: torch.Tensor) -> None:
            event = AttentionEvent(site.kind, site.stream, site.layer, probs.detach())
            self.recording.events.append(event)
            if probs.requires_grad:
                def keep(grad: torch.Tensor) -> None:
                    event.grad = grad.detach()

                probs.register_hook(keep)

        return record

    def _dispatcher_for(self, sites: list[AttentionSite]) -> Callable[[torch.Tensor], None]:
        """One recorder per call of a shared module: call k goes to site k mod len(sites)."""
        records = [self._recorder_for(site) for site in sites]
        if len(records) == 1:
            return records[0]
        calls = itertools.count()

        def record(probs: torch.Tensor) -> None:
            records[next(calls) % len(records)](probs)

        return record

    def __enter__(self) -> Recording:
        by_module: dict[int, list[AttentionSite]] = {}
        for site in self.sites:
            by_module.setdefault(id(site.module), []).append(site)
        try:
            for sites in by_module.values():
                if len({(s.backend, s.attribute) for s in sites}) > 1:
                    raise ValueError(f"sites of one {type(sites[0].module).__name__} disagree on the backend")
                self._install(sites[0], self._dispatcher_for(sites))
        except BaseException:
            self._restore()
            raise
        return self.recording

    def __exit__(self, *exc_info: object) -> None:
        self._restore()

    def _restore(self) -> None:
        while self._undo:
            self._undo.pop()()

    def _install(self, site: AttentionSite, record: Callable[[torch.Tensor], None]) -> None:
        if site.backend == "hf":
            undo = use_hf_backend(site.module)
            _HF_SITES[site.module] = record
            self._undo.append(lambda: (_HF_SITES.pop(site.module, None), undo()))
        elif site.backend == "timm":
            previous = site.module.fused_attn
            site.module.fused_attn = False
            handle = site.module.attn_drop.register_forward_hook(lambda _m, _i, output: record(output))
            self._undo.append(lambda: (handle.remove(), setattr(site.module, "fused_attn", previous)))
        elif site.backend == "dropout":
            handle = getattr(site.module, site.attribute).register_forward_hook(lambda _m, _i, output: record(output))
            self._undo.append(handle.remove)
        elif site.backend == "mha":
            stand_in, undo = mha_stand_in(site.module, site.attribute)
            stand_in.records.append(record)
            self._undo.append(lambda: (stand_in.records.remove(record), undo()))
        else:
            raise ValueError(f"unknown attention backend {site.backend!r}")


def mha_stand_in(owner: torch.nn.Module, name: str) -> tuple[_RecordingMultiheadAttention, Callable[[], None]]:
    """The stand-in at `owner.name`, installed unless a recorder or mask already did; returns it and the undo."""
    current = getattr(owner, name)
    if isinstance(current, _RecordingMultiheadAttention):
        return current, lambda: None
    stand_in = _RecordingMultiheadAttention(current)
    setattr(owner, name, stand_in)
    return stand_in, lambda: setattr(owner, name, current)


def events_by_layer(events: list[AttentionEvent]) -> Iterator[AttentionEvent]:
    """Events in layer order, checking each has a gradient (a missing one means a wrong hook)."""
    for event in sorted(events, key=lambda e: e.layer):
        if event.grad is None:
            raise RuntimeError(f"no gradient reached the {event.kind} attention of {event.stream} layer {event.layer}")
        yield event
