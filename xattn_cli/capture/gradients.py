"""Where gradients start: parameters frozen, and the graph begun at the inputs or at one attention block.

Gradients reach every attention map a method reads, never the parameters. Each context removes its hooks
and restores the parameters' flags in `finally`.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator, Sequence

import torch

from xattn_cli.capture.recorder import AttentionSite


@contextlib.contextmanager
def frozen_parameters(model: torch.nn.Module) -> Iterator[None]:
    """No parameter collects a gradient for the duration; flags are restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for parameter, _ in flags:
            parameter.requires_grad_(False)
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


@contextlib.contextmanager
def _gradients_with_hooks(model: torch.nn.Module, handles: list) -> Iterator[None]:
    """Gradients on and parameters frozen while the registered `handles` live; they are removed after."""
    try:
        with frozen_parameters(model), torch.enable_grad():
            yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def input_gradients_only(model: torch.nn.Module) -> Iterator[None]:
    """Gradients flow from the inputs (and so through every attention map), never into parameters.

    Embedding outputs are made to require grad so that token inputs (integers) still give a graph.
    """
    handles = [m.register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
               for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    with _gradients_with_hooks(model, handles):
        yield


def _start_graph_here(_module: torch.nn.Module, args: tuple, kwargs: dict, *,
                      batch_size: int | None = None) -> tuple[tuple, dict] | None:
    """Forward pre-hook: the module's hidden-state input becomes a fresh leaf that requires grad.

    With `batch_size`, a batch-1 input (one text, the same for every image) is widened to the batch here, so
    the blocks below run once and each sample still gets its own gradient from this block on.
    """
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not torch.is_tensor(hidden):
        return None
    start = hidden.detach()
    if batch_size is not None and start.shape[0] == 1 < batch_size:
        start = start.expand(batch_size, *start.shape[1:]).clone()  # (1, L, D) → (B, L, D)
    start.requires_grad_(True)
    swap = lambda value: start if value is hidden else value  # noqa: E731  (q, k and v may be one tensor)
    return tuple(swap(value) for value in args), {key: swap(value) for key, value in kwargs.items()}


@contextlib.contextmanager
def gradients_from(model: torch.nn.Module, starts: Sequence[torch.nn.Module],
                   batch_size: int | None = None) -> Iterator[None]:
    """The autograd graph begins at the input of each module in `starts` (per stream, the first attention
    block whose gradient a method uses), so each backward pass stops there instead of running down to the
    pixels: the gradients of that block's and every later attention map are unchanged. Parameters are frozen.
    With `batch_size`, batch-1 inputs are widened there (`_start_graph_here`).
    """
    hook = functools.partial(_start_graph_here, batch_size=batch_size)
    handles = [module.register_forward_pre_hook(hook, with_kwargs=True) for module in starts]
    with _gradients_with_hooks(model, handles):
        yield


def first_layer_read(last_layer_only: bool, last_layer: int, start_layer: int) -> int:
    """The first layer whose attention a method reads: the last one, or every one from `start_layer`."""
    return last_layer if last_layer_only else start_layer


def first_gradient_sites(sites: Sequence[AttentionSite], start_layers: dict[str, int],
                         last_layer_only: bool) -> list[torch.nn.Module]:
    """Per stream of `start_layers`, the module of the first layer whose gradient a method reads."""
    modules = []
    for stream, start_layer in start_layers.items():
        layers = sorted((site.layer, index) for index, site in enumerate(sites) if site.stream == stream)
        if not layers:
            continue
        first = first_layer_read(last_layer_only, layers[-1][0], start_layer)
        chosen = [index for layer, index in layers if layer >= first]
        if chosen:
            modules.append(sites[chosen[0]].module)
    return modules
