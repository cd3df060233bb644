"""overlay_heatmap: alpha blending through a colormap, plus drawn points and boxes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from xattn_cli.render.overlay import overlay_heatmap

GREY = (100, 100, 100)
JET_AT_0 = (0, 0, 127)  # matplotlib's jet, lowest value
JET_AT_1 = (127, 0, 0)  # matplotlib's jet, highest value


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(int)


def test_alpha_extremes_give_image_or_colormap() -> None:
    image = Image.new("RGB", (4, 3), GREY)
    heat = np.zeros((3, 4))
    heat[1, 2] = 1.0
    assert _pixels(overlay_heatmap(image, heat, alpha=0.0)).tolist() == _pixels(image).tolist()
    coloured = _pixels(overlay_heatmap(image, heat, alpha=1.0))
    np.testing.assert_allclose(coloured[0, 0], JET_AT_0, atol=1)
    np.testing.assert_allclose(coloured[1, 2], JET_AT_1, atol=1)


def test_half_alpha_blends_and_keeps_size_and_mode() -> None:
    image = Image.new("L", (5, 2), 200)
    result = overlay_heatmap(image, np.zeros((2, 5), dtype=np.float32), alpha=0.5, colormap="gray")
    assert result.mode == "RGB" and result.size == (5, 2)
    np.testing.assert_allclose(_pixels(result)[1, 4], [100, 100, 100], atol=1)


def test_non_finite_values_count_as_zero_and_out_of_range_is_clipped() -> None:
    image = Image.new("RGB", (3, 1), GREY)
    heat = np.array([[np.nan, np.inf, 7.0]])
    result = _pixels(overlay_heatmap(image, heat, alpha=1.0))
    np.testing.assert_allclose(result[0, 0], JET_AT_0, atol=1)
    np.testing.assert_allclose(result[0, 1], JET_AT_0, atol=1)
    np.testing.assert_allclose(result[0, 2], JET_AT_1, atol=1)


def test_heatmap_must_match_image_size() -> None:
    with pytest.raises(ValueError, match="does not match"):
        overlay_heatmap(Image.new("RGB", (4, 3)), np.zeros((4, 3)))


@pytest.mark.parametrize(("alpha", "colormap"), [(1.5, "jet"), (0.5, "no-such-map")])
def test_bad_alpha_or_colormap_is_a_value_error(alpha: float, colormap: str) -> None:
    with pytest.raises(ValueError):
        overlay_heatmap(Image.new("RGB", (2, 2)), np.zeros((2, 2)), alpha=alpha, colormap=colormap)


def test_points_and_boxes_are_drawn() -> None:
    image = Image.new("RGB", (60, 40), GREY)
    heat = np.zeros((40, 60))
    plain = _pixels(overlay_heatmap(image, heat, alpha=0.0))
    marked = _pixels(
        overlay_heatmap(image, heat, alpha=0.0, points=[(10, 10)], boxes=[(30, 5, 55, 35, "star")])
    )
    assert marked[10, 10].tolist() == [0, 0, 0]  # dot centre
    assert marked[10, 8].tolist() == [255, 255, 255]  # dot border
    assert marked[30, 30].tolist() == [255, 255, 255]  # left edge of the box
    assert marked[30, 40].tolist() == plain[30, 40].tolist()  # box inside untouched
    assert (marked[7:20, 32:54] != plain[7:20, 32:54]).any()  # label tab drawn
