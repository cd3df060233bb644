"""Where and in what precision models run: device names, autocast, and the CPU denormal switch."""
from __future__ import annotations

import contextlib
import os
import re

import torch

from xattn_cli.errors import UsageError

PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(device: str) -> str:
    """'auto' → cuda when available; 'cuda' without CUDA is a usage error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda:all":
        raise UsageError("--device cuda:all (one worker per GPU) is for surgery, relevancy and mask runs")
    if device != "cpu" and not re.fullmatch(r"cuda(:\d+)?", device):
        raise UsageError(f"unknown device {device!r} (auto, cpu, cuda or cuda:N)")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("device cuda was asked for, but CUDA is not available on this machine")
    return device


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity, where the OS tells it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_threads() -> int:
    """Torch threads for a run: half the usable cores, at least one; the other half decodes images and writes
    files beside the model. Two torch threads on 2 shared cores beside the decoder and the writers made a run
    several times slower (benchmarks/perf.md)."""
    return max(1, usable_cores() // 2)


def set_threads(threads: int | None) -> int:
    """Set torch's CPU threads (`None`: `default_threads()`); the number set."""
    count = default_threads() if threads is None else threads
    torch.set_num_threads(count)
    return count


def autocast(device: str, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for the model forward; fp32 runs as is."""
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r} (fp32, fp16 or bf16)")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    if device == "cpu" and dtype is torch.float16:
        raise UsageError("precision fp16 needs CUDA; use bf16 or fp32 on the CPU")
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


def flush_denormals() -> None:
    """Treat denormal floats as zero on the CPU: tiny models hit them and run many times slower (DESIGN §7)."""
    torch.set_flush_denormal(True)
