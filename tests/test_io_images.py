"""load_image: every decodable file becomes upright 8-bit RGB; every bad one a typed ItemError."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xattn_cli.io.images import ItemError, load_image


def _save(image: Image.Image, path: Path, **params: object) -> Path:
    image.save(path, **params)
    return path


def _error_type(path: Path, **kwargs: int) -> str:
    with pytest.raises(ItemError) as info:
        load_image(path, **kwargs)
    assert str(path) in info.value.message and "\n" not in info.value.message
    return info.value.type


def test_rgb_png_round_trips_exactly(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    image = load_image(_save(Image.fromarray(pixels), tmp_path / "a.png"))
    assert image.mode == "RGB" and image.size == (7, 5)
    np.testing.assert_array_equal(np.asarray(image), pixels)


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    path = _save(Image.new("CMYK", (8, 6), (0, 255, 255, 0)), tmp_path / "c.jpg", quality=95)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (8, 6)
    red, green, blue = np.asarray(image)[3, 4]
    assert red > 200 and green < 60 and blue < 60


def test_sixteen_bit_png_scales_instead_of_clipping(tmp_path: Path) -> None:
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    path = _save(Image.fromarray(values), tmp_path / "deep.png")
    image = load_image(path)
    assert image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image)[0, :, 0], [0, 1, 128, 255])


def test_mode_i_with_small_values_is_kept_as_8_bit(tmp_path: Path) -> None:
    path = _save(Image.fromarray(np.array([[0, 100, 255]], dtype=np.int32)), tmp_path / "i.tif")
    np.testing.assert_array_equal(np.asarray(load_image(path))[0, :, 0], [0, 100, 255])


def test_float_image_in_unit_range_scales_to_255(tmp_path: Path) -> None:
    path = _save(Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)), tmp_path / "f.tif")
    np.testing.assert_array_equal(np.asarray(load_image(path))[0, :, 1], [0, 128, 255])


def test_palette_transparency_composites_over_white(tmp_path: Path) -> None:
    palette_image = Image.new("P", (4, 4), 0)
    palette_image.putpalette([0, 0, 255] + [255, 0, 0] * 255)
    palette_image.putpixel((0, 0), 1)
    path = _save(palette_image, tmp_path / "p.png", transparency=0)
    pixels = np.asarray(load_image(path))
    np.testing.assert_array_equal(pixels[1, 1], [255, 255, 255])
    np.testing.assert_array_equal(pixels[0, 0], [255, 0, 0])


def test_la_alpha_composites_over_white(tmp_path: Path) -> None:
    grey_alpha = np.zeros((2, 2, 2), dtype=np.uint8)
    grey_alpha[0, 0] = (0, 255)  # opaque black
    grey_alpha[1, 1] = (0, 128)  # half-transparent black
    pixels = np.asarray(load_image(_save(Image.fromarray(grey_alpha, "LA"), tmp_path / "la.png")))
    np.testing.assert_array_equal(pixels[0, 0], [0, 0, 0])
    np.testing.assert_array_equal(pixels[0, 1], [255, 255, 255])
    assert 120 <= pixels[1, 1, 0] <= 135


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    path = _save(Image.new("RGB", (40, 20), "red"), tmp_path / "rot.jpg", exif=exif)
    assert load_image(path).size == (20, 40)


@pytest.mark.parametrize(
    ("mode", "colour", "suffix"),
    [("L", 77, ".png"), ("1", 1, ".png"), ("RGB", (1, 2, 3), ".tif"), ("RGB", (1, 2, 3), ".bmp")],
)
def test_other_modes_and_formats_become_rgb(tmp_path: Path, mode: str, colour: object, suffix: str) -> None:
    image = load_image(_save(Image.new(mode, (3, 2), colour), tmp_path / f"x{suffix}"))
    assert image.mode == "RGB" and image.size == (3, 2)


def test_webp_decodes(tmp_path: Path) -> None:
    image = load_image(_save(Image.new("RGB", (9, 9), (0, 200, 0)), tmp_path / "w.webp", lossless=True))
    np.testing.assert_array_equal(np.asarray(image)[4, 4], [0, 200, 0])


def test_one_pixel_image(tmp_path: Path) -> None:
    assert load_image(_save(Image.new("RGB", (1, 1), "blue"), tmp_path / "one.png")).size == (1, 1)


def test_animated_gif_gives_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (6, 6), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    path = _save(frames[0], tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    red, green, blue = np.asarray(load_image(path))[3, 3]
    assert red > 200 and blue < 50


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_file_is_unreadable(tmp_path: Path, suffix: str) -> None:
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    whole = _save(Image.fromarray(noise), tmp_path / f"whole{suffix}")
    truncated = tmp_path / f"half{suffix}"
    data = whole.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    assert _error_type(truncated) == "UnreadableImage"


def test_zero_byte_and_text_files_are_unreadable(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("not an image\n")
    assert _error_type(tmp_path / "empty.png") == "UnreadableImage"
    assert _error_type(tmp_path / "notes.jpg") == "UnreadableImage"


def test_missing_file_and_directory(tmp_path: Path) -> None:
    assert _error_type(tmp_path / "missing.png") == "FileNotFound"
    assert _error_type(tmp_path) == "NotAFile"


def test_permission_denied_is_unreadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _save(Image.new("RGB", (2, 2)), tmp_path / "locked.png")

    def deny(*args: object, **kwargs: object) -> Image.Image:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Image, "open", deny)  # chmod alone does not stop root, who may run the tests
    assert _error_type(path) == "UnreadableImage"


def test_pixel_limit_checked_from_header(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (20, 20)), tmp_path / "big.png")
    assert _error_type(path, max_pixels=100) == "ImageTooLarge"
    assert load_image(path, max_pixels=400).size == (20, 20)


def test_pil_decompression_bomb_limit_becomes_image_too_large(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # warns above 50 pixels, refuses above 100
    path = _save(Image.new("RGB", (8, 8)), tmp_path / "warn.png")
    assert _error_type(path, max_pixels=10_000) == "ImageTooLarge"
    path = _save(Image.new("RGB", (20, 20)), tmp_path / "bomb.png")
    assert _error_type(path, max_pixels=10_000) == "ImageTooLarge"


def test_item_error_record_and_pickle() -> None:
    error = ItemError("FileNotFound", "x.png: no such file")
    assert error.to_record() == {"type": "FileNotFound", "message": "x.png: no such file"}
    assert str(error) == "x.png: no such file"
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.type, copy.message) == (error.type, error.message)
