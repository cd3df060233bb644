"""Decoding images ahead of the model: DataLoader workers, a bounded queue, input order kept.

Each item comes back as `(path, image, None)` or `(path, None, ItemError)`, so a bad file becomes an
error record and never stops the stream. With `workers=0` images are decoded in this process.
"""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from typing import Iterator, Sequence

from PIL import Image
from torch.utils.data import DataLoader, Dataset

from xattn_cli.errors import ItemError
from xattn_cli.io.images import load_image

Decoded = tuple[str, "Image.Image | None", "ItemError | None"]


def default_workers(n_items: int, batch_size: int) -> int:
    """No workers for runs too short to repay their start-up; else half the cores, at most 4."""
    if n_items <= 2 * batch_size:
        return 0
    return min(4, max(1, (os.cpu_count() or 2) // 2))


def decode(path: str, max_pixels: int) -> Decoded:
    try:
        return path, load_image(path, max_pixels), None
    except ItemError as error:
        return path, None, error


class _DecodedImages(Dataset):
    def __init__(self, paths: Sequence[str], max_pixels: int):
        self.paths, self.max_pixels = list(paths), max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Decoded:
        return decode(self.paths[index], self.max_pixels)


def _as_is(item: Decoded) -> Decoded:
    return item


def _die_with_parent(_worker_id: int) -> None:
    """A worker must not outlive a killed run: its pending results would hold the run's stdout open."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        parent = multiprocessing.parent_process()
        if parent is not None and os.getppid() != parent.pid:  # it died before the line above
            os._exit(1)


def decoded_images(paths: Sequence[str], max_pixels: int, workers: int, lookahead: int) -> Iterator[Decoded]:
    """Images of `paths` in order; at most about `lookahead` decoded images wait in memory."""
    if workers <= 0:
        for path in paths:
            yield decode(path, max_pixels)
        return
    context = "fork" if sys.platform.startswith("linux") else None  # Linux: no re-import per worker
    loader = DataLoader(_DecodedImages(paths, max_pixels), batch_size=None, num_workers=workers,
                        collate_fn=_as_is, prefetch_factor=max(2, lookahead // workers),
                        multiprocessing_context=context, worker_init_fn=_die_with_parent)
    stream = iter(loader)
    try:
        yield from stream
    finally:
        del stream  # the iterator's finaliser stops the workers now, not when a traceback is freed
