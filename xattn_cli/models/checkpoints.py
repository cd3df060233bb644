"""Safe weight loading: safetensors first, `torch.load(weights_only=True)` otherwise.

Accepted layouts: a bare state dict, a training checkpoint that wraps it (`{"state_dict": ...}`,
`{"model": ...}`, with or without DataParallel's `module.` prefix), and OpenAI's original CLIP `.pt`
TorchScript archives (code, so only with `trust_checkpoint`, as for pickle).
"""
from __future__ import annotations

import contextlib
import logging
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Iterator

import torch

from xattn_cli.errors import UsageError


def load_state_dict(path: str | Path, trust_checkpoint: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file. Arbitrary pickle (which can run code) only with `trust_checkpoint`."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return _unprefixed(load_file(str(path)))
        except Exception as error:  # safetensors raises several types for bad headers
            raise UsageError(f"cannot read checkpoint {path}: {error}") from None
    if is_torchscript(path):
        return _torchscript_state_dict(path, trust_checkpoint)
    try:
        state = torch.load(path, map_location="cpu", weights_only=not trust_checkpoint)
    except pickle.UnpicklingError:
        raise UsageError(f"checkpoint {path} needs arbitrary pickle, which can run code; pass "
                         "--trust-checkpoint only if you trust its source, or convert it to safetensors") from None
    except Exception as error:
        raise UsageError(f"cannot read checkpoint {path}: {type(error).__name__}") from None
    for wrapper in ("state_dict", "model"):  # training checkpoints: {"epoch": ..., "state_dict": {...}}
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict) or not all(torch.is_tensor(value) for value in state.values()):
        raise UsageError(f"checkpoint {path} holds no state dict of tensors (looked at the file, its "
                         "'state_dict' and its 'model')")
    return _unprefixed(state)


def _unprefixed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Without DataParallel's `module.` prefix."""
    return {key.removeprefix("module."): value for key, value in state.items()}


def is_torchscript(path: Path) -> bool:
    """Whether `path` is a TorchScript archive (a zip holding `code/`), like OpenAI's CLIP `.pt` files."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/")[1:2] == ["code"] for name in archive.namelist())


def _torchscript_state_dict(path: Path, trust_checkpoint: bool) -> dict[str, torch.Tensor]:
    """The tensors of a TorchScript archive, read as open_clip reads OpenAI's: the archive's own scalars
    (input_resolution, context_length, vocab_size) are not weights."""
    if not trust_checkpoint:
        raise UsageError(f"checkpoint {path} is a TorchScript archive, which holds code; pass "
                         "--trust-checkpoint only if you trust its source, or convert it to safetensors")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
    except Exception as error:
        raise UsageError(f"cannot read TorchScript checkpoint {path}: {type(error).__name__}") from None
    return {key: value for key, value in state.items()
            if key not in ("input_resolution", "context_length", "vocab_size")}


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strictly load `state`, naming the first mismatched key on failure."""
    expected = model.state_dict()
    for key, tensor in expected.items():
        if key not in state:
            raise UsageError(f"checkpoint {source} does not fit the architecture: missing key {key!r}")
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise UsageError(f"checkpoint {source} does not fit the architecture: {key!r} has shape "
                             f"{tuple(state[key].shape)}, expected {tuple(tensor.shape)}")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise UsageError(f"checkpoint {source} does not fit the architecture: unexpected key {unexpected[0]!r}")
    model.load_state_dict({key: value.to(expected[key].dtype) for key, value in state.items()})


@contextlib.contextmanager
def built_for_weights() -> Iterator[None]:
    """Build a model whose every weight is about to be loaded: `torch.nn.init` fills nothing (random init of
    ViT-B/16 costs seconds on a CPU; `load_into` then checks that every weight came from the file), and
    open_clip's "No pretrained weights loaded" warning, untrue here, is dropped."""
    names = [name for name in dir(torch.nn.init) if name.endswith("_") and not name.startswith("_")]
    originals = {name: getattr(torch.nn.init, name) for name in names}
    untrue = _DropMessage("No pretrained weights loaded")
    root = logging.getLogger()
    root.addFilter(untrue)
    try:
        for name in names:
            setattr(torch.nn.init, name, _leave_as_is)
        yield
    finally:
        for name, function in originals.items():
            setattr(torch.nn.init, name, function)
        root.removeFilter(untrue)


def _leave_as_is(tensor: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    return tensor


class _DropMessage(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)
