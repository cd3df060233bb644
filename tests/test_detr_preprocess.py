"""DETR preprocessing as transformers' `DetrImageProcessor` does it: shortest/longest-edge resize with the
aspect ratio kept, bottom/right padding to the batch's largest image, a pixel mask, and maps read from each
image's own cells only."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import assert_batch_equals_single_runs
from test_coattention_reference import _detr_model

EDGES = (48, 80)  # shortest, longest


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(60, 40), (30, 90), (50, 50)]  # (W, H): tall, wide (longest edge binds), square
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


@pytest.fixture(scope="module")
def adapter():
    from xattn_cli.models.detr import DetrAdapter

    return DetrAdapter(_detr_model(), size=(EDGES[0], EDGES[0]), edges=EDGES)


def test_pixels_and_mask_are_the_processors(adapter) -> None:
    from transformers import DetrImageProcessor

    processor = DetrImageProcessor(size={"shortest_edge": EDGES[0], "longest_edge": EDGES[1]},
                                   image_mean=list(adapter.mean), image_std=list(adapter.std))
    expected = processor(_images(), return_tensors="pt")
    inputs = adapter.preprocess(_images(), adapter.native_size)
    assert torch.equal(inputs.mask, expected["pixel_mask"].long())
    one_level = 1.001 / 255 / min(adapter.std)  # at most one uint8 level apart (rounding in the resize)
    torch.testing.assert_close(inputs.pixels, expected["pixel_values"], atol=one_level, rtol=0)
    with torch.no_grad():
        logits, boxes = adapter.detect(inputs)
        output = adapter.model(pixel_values=inputs.pixels, pixel_mask=expected["pixel_mask"])
    torch.testing.assert_close(logits, output.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(boxes, output.pred_boxes, atol=1e-5, rtol=1e-5)


def test_each_map_reads_only_its_images_cells(adapter) -> None:
    """The padded batch's feature map (stride 8 here) is cropped to the cells of each image's own pixels,
    row-major, before the map is upsampled to that image."""
    inputs = adapter.preprocess(_images(), adapter.native_size)
    assert tuple(inputs.pixels.shape[-2:]) == (80, 72)  # (48, 72), (80, 27), (48, 48) padded
    row = torch.arange(10 * 9, dtype=torch.float32)  # one relevance per encoder token of the padded batch
    for index, own in enumerate([(6, 9), (10, 4), (6, 6)]):  # ceil of each resized side / 8
        tokens, grid = adapter.image_tokens(inputs, index, row)
        assert grid == own
        torch.testing.assert_close(tokens, row.reshape(10, 9)[: own[0], : own[1]].reshape(-1))


def test_detections_of_a_padded_batch_have_maps_and_boxes_of_each_image(adapter) -> None:
    from xattn_cli.explainers.detection import DetectionRelevancy

    images = _images()
    for image, targets in zip(images, DetectionRelevancy(adapter, threshold=0.0).explain(images)):
        assert targets
        for target in targets:
            assert target.map.shape == (image.height, image.width) and np.isfinite(target.map).all()
            x0, y0, x1, y1 = target.extra["box"]
            assert -image.width <= x0 <= x1 <= 2 * image.width and -image.height <= y0 <= y1 <= 2 * image.height


def test_a_batch_gives_what_single_runs_give(adapter) -> None:
    """Images of different resized sizes are explained apart (padding would change their border features),
    so an image's scores and maps do not depend on its batch neighbours."""
    from xattn_cli.explainers.detection import DetectionRelevancy

    images = [*_images(), _images()[0].transpose(Image.FLIP_LEFT_RIGHT)]  # the last resizes like the first
    assert_batch_equals_single_runs(DetectionRelevancy(adapter, threshold=0.0), images, atol=1e-4)


@pytest.mark.parametrize("processor, edges", [
    ({"size": 800, "max_size": 1333}, (800, 1333)),  # older processor files: an int and a top-level max_size
    ({"size": {"shortest_edge": 600, "longest_edge": 1000}}, (600, 1000)),
    ({"size": {"height": 64, "width": 64}}, None),  # a fixed size squashes, as transformers does
])
def test_processor_size_formats(tmp_path, processor, edges) -> None:
    import json
    import shutil

    from xattn_cli.config import data_path
    from xattn_cli.models.registry import load_model

    folder = tmp_path / "detr"
    shutil.copytree(data_path("assets/models/shapes-detr"), folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    assert load_model(f"hf:{folder}").edges == edges
