"""Robust image decoding: any readable file becomes an RGB PIL image at its original size.

Every failure becomes an `ItemError` with a type and a one-line message naming the file, so a batch
can record the bad item and carry on instead of crashing.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from xattn_cli.errors import ItemError

DEFAULT_MAX_PIXELS = 64_000_000
"""Largest pixel count (width × height) decoded by default: 64 MP is above any camera photo a user is
likely to explain, and far below what exhausts memory once an RGB copy and float maps exist. It is checked
from the header before any pixel is decoded. PIL's own decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`)
still applies on top of it, as a ceiling."""

ALPHA_BACKGROUND = (255, 255, 255)
"""Colour that transparent pixels are composited over: white, as browsers and viewers show them."""

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


def load_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode `path` fully into an RGB image at its original size, upright per its EXIF orientation.

    Animated images give their first frame. Raises `ItemError` (FileNotFound, NotAFile, ImageTooLarge,
    UnreadableImage) for any file that cannot become such an image; no file handle stays open.
    """
    path = Path(path)
    _check_regular_file(path)
    return _decode(path, path, max_pixels)


def load_image_bytes(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """`load_image` of an encoded image held in memory (a Ray Data column, an HTTP body); errors name `name`."""
    return _decode(io.BytesIO(data), name, max_pixels)


def _decode(source: Path | BinaryIO, name: str | Path, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise ItemError(
                        "ImageTooLarge",
                        f"{name}: {width}x{height} pixels exceeds the limit of {max_pixels} pixels",
                    )
                img.load()
                upright = ImageOps.exif_transpose(img)  # always a new image, independent of the file
                return _to_rgb(upright)
    except ItemError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ItemError("ImageTooLarge", f"{name}: {_one_line(exc)}") from exc
    except FileNotFoundError as exc:
        raise ItemError("FileNotFound", f"{name}: no such file") from exc
    except PermissionError as exc:
        raise ItemError("UnreadableImage", f"{name}: permission denied") from exc
    except Exception as exc:  # PIL raises many types for corrupt data (OSError, SyntaxError, ValueError...)
        raise ItemError("UnreadableImage", f"{name}: cannot decode image ({_one_line(exc)})") from exc


def _check_regular_file(path: Path) -> None:
    """Reject missing paths and non-files (directories, FIFOs, devices) before opening: a FIFO would block."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError as exc:
        raise ItemError("FileNotFound", f"{path}: no such file") from exc
    except PermissionError as exc:
        raise ItemError("UnreadableImage", f"{path}: permission denied") from exc
    except OSError as exc:
        raise ItemError("UnreadableImage", f"{path}: {_one_line(exc)}") from exc
    if stat.S_ISDIR(mode):
        raise ItemError("NotAFile", f"{path}: is a directory, not an image file")
    if not stat.S_ISREG(mode):
        raise ItemError("NotAFile", f"{path}: is not a regular file")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any decoded mode to 8-bit RGB without clipping high bit depths or leaving alpha black."""
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT_MODES:
        return _grey_to_rgb(np.asarray(img).astype(np.float64) / 257.0)
    if img.mode == "I":
        values = np.clip(np.asarray(img).astype(np.float64), 0, 65535)
        return _grey_to_rgb(values / 257.0 if values.max(initial=0) > 255 else values)
    if img.mode == "F":
        return _grey_to_rgb(_float_to_8bit_range(np.asarray(img)))
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _float_to_8bit_range(values: np.ndarray) -> np.ndarray:
    """Map a float image to [0, 255]: [0, 1] data is scaled, [0, 255] data kept, anything else min-max
    normalised; non-finite values become 0."""
    values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if values.size == 0:
        return values
    low, high = float(values.min()), float(values.max())
    if low >= 0 and high <= 1:
        return values * 255.0
    if low >= 0 and high <= 255:
        return values
    return (values - low) / ((high - low) or 1.0) * 255.0


def _grey_to_rgb(values: np.ndarray) -> Image.Image:
    """An RGB image from greyscale values already in [0, 255] (rounded, not truncated)."""
    grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def _one_line(exc: BaseException) -> str:
    """The exception as a single line, for messages that must fit one line of a table or log."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
