"""Write shapes-world scenes in the dataset folder format of DESIGN §5.

    DIR/images/<id>.png, DIR/masks/<id>_<k>.png (binary), DIR/annotations.jsonl (one line per image)

`xattn bench quality --data DIR` reads any folder in this format, so users can bring their own.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from xattn_cli.errors import UsageError
from xattn_cli.io.outputs import atomic_save_png, atomic_write_bytes
from xattn_cli.world.shapes import FREE, ColourRule, check_style, scene_at

CONFOUNDED_BIAS = 0.9  # in the confounded world 90% of objects wear their shape's colour


def export_dataset(folder: str | Path, count: int, seed: int, size: int = 224, confounded: bool = False,
                   colour_rule: ColourRule = FREE, style: str = "classic") -> Path:
    """Scenes `0..count-1` of stream `seed` under `colour_rule` (`confounded` applies to the free rule only),
    drawn in `style`; returns the annotations file."""
    check_style(style)
    if confounded and colour_rule != FREE:
        raise UsageError(f"the confounded world is the free colour rule with a 90% bias; it cannot be combined with {colour_rule}")
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(exist_ok=True)
    lines = []
    for index in range(count):
        scene = scene_at(seed, index, size=size, color_bias=CONFOUNDED_BIAS if confounded else 0.0,
                         colour_rule=colour_rule, style=style)
        ident = f"{index:06d}"
        atomic_save_png(folder / "images" / f"{ident}.png", scene.image)
        objects = []
        for obj in scene.objects:
            mask_path = f"masks/{ident}_{obj.k}.png"
            atomic_save_png(folder / mask_path, Image.fromarray(obj.mask.astype(np.uint8) * 255))
            objects.append({"k": obj.k, "shape": obj.shape, "color": obj.color, "box": list(obj.box),
                            "mask": mask_path})
        lines.append(json.dumps({"id": ident, "image": f"images/{ident}.png", "size": list(scene.size),
                                 "objects": objects, "captions": scene.captions, "qa": scene.qa}))
    annotations = folder / "annotations.jsonl"
    atomic_write_bytes(annotations, ("\n".join(lines) + "\n").encode())
    return annotations
