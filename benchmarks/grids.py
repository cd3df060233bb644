"""Finer token grids: what the bundled models' 8×8 grid costs their maps, and what a 16×16 grid costs them.

    python benchmarks/grids.py [--scenes 300] [--steps 5] [--json grids.json]

Ceiling: the best map a method can paint on a grid is each token's share of the object; upsampled as the
explainers upsample (`tensors.to_image`), its pointing (peak inside the object) and mIoU at the mean threshold,
for each object of 2–4-object scenes of the style-shifted split at 64 px, are what the grid alone allows
(also at 12×12: shapes-clip's surgery runs at 96 px).

Cost: one training step (forward, backward, AdamW; batch 64, one thread) of each bundled architecture at its
8×8 grid and at 16×16 at the same 64 px input (ViT and CLIP's image tower: patch 4 instead of 8; LXMERT and
VisualBERT: a two-stage stem with 4-pixel cells instead of three stages with 8-pixel cells), the median of
`--steps` after one warm-up step, on random inputs (the cost does not depend on what the pixels show).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import numpy as np
import torch

from _report import save_json
from xattn_cli.config import load_config
from xattn_cli.eval.metrics import mean_threshold_miou, pointing, pool_to_tokens
from xattn_cli.eval.quality import held_out_scenes
from xattn_cli.tensors import to_image

SEED, STYLE, SIZE, BATCH = 26_000, "shifted", 64, 64
GRIDS = ((8, 8), (16, 16))  # the cost is measured at these
CEILING_GRIDS = ((8, 8), (12, 12), (16, 16))  # 12×12: shapes-clip's surgery runs its 8-pixel patches at 96 px


def ceiling(scenes: int) -> dict:
    """Per grid: the mean pointing and mIoU of each object's token-share map."""
    figures = {}
    drawn = [scene for _, scene in held_out_scenes(scenes, SEED, STYLE)]
    for grid in CEILING_GRIDS:
        hits, mious = [], []
        for scene in drawn:
            for obj in scene.objects:
                share = pool_to_tokens(obj.mask.astype(np.float32), grid)  # (N,)
                heat, _ = to_image(share, (SIZE, SIZE), grid=grid)
                heat = heat.numpy()
                hits.append(pointing(heat, obj.mask))
                mious.append(mean_threshold_miou(heat, obj.mask))
        figures[f"{grid[0]}x{grid[1]}"] = {"pointing": float(np.mean(hits)), "miou": float(np.mean(mious)),
                                           "objects": len(hits)}
    return figures


def vit(grid: int):
    from xattn_cli.models.vit import build_vit

    cfg = copy.deepcopy(load_config("shapes-vit"))
    cfg["hf_config"]["patch_size"] = SIZE // grid
    model = build_vit(cfg)
    pixels = torch.randn(BATCH, 3, SIZE, SIZE)
    return model, lambda: model(pixel_values=pixels).logits.sum()


def clip(grid: int):
    from xattn_cli.models.openclip import build_clip

    arch = copy.deepcopy(load_config("shapes-clip")["arch"])
    arch["vision_cfg"]["patch_size"] = SIZE // grid
    model = build_clip(arch, vocab_size=83)
    pixels = torch.randn(BATCH, 3, SIZE, SIZE)
    tokens = torch.randint(0, 83, (BATCH, arch["text_cfg"]["context_length"]))
    return model, lambda: (model.encode_image(pixels) @ model.encode_text(tokens).T).logsumexp(dim=1).sum()


def region_vqa(family: str):
    def build(grid: int):
        from xattn_cli.models.regions import build_region_vqa
        from xattn_cli.models.registry import load_model

        bundled = load_model(f"shapes-{family}", device="cpu")
        cfg = copy.deepcopy(load_config(f"shapes-{family}"))
        cell = SIZE // grid
        stages = int(np.log2(cell))
        cfg["regions"].update(grid=[grid, grid], cell=cell)
        cfg["regions"]["stem"]["widths"] = cfg["regions"]["stem"]["widths"][-stages:]  # same output width
        adapter = build_region_vqa(family, cfg, bundled.tokenizer, bundled.answers)
        pixels = torch.rand(BATCH, SIZE, SIZE, 3) * 2 - 1
        batch = adapter.tokenize(["what colour is the star?"] * BATCH)
        modules = torch.nn.ModuleList([adapter.model, adapter.regions.stem])

        def loss():
            regions = adapter.regions.regions(adapter.regions.stem(pixels))
            return adapter.answer_logits(batch, regions).logsumexp(dim=1).sum()

        return modules.train(), loss
    return build


ARCHITECTURES = {"shapes-vit": vit, "shapes-clip": clip, "shapes-lxmert": region_vqa("lxmert"),
                 "shapes-visualbert": region_vqa("visualbert")}


def step_seconds(build, grid: int, steps: int) -> dict:
    torch.manual_seed(0)
    model, loss = build(grid)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for _ in range(steps + 1):
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss().backward()
        optimizer.step()
        times.append(time.perf_counter() - started)
    return {"step_s": statistics.median(times[1:]), "parameters": sum(p.numel() for p in model.parameters())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=300)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args()
    result = {"style": STYLE, "seed": SEED, "scenes": args.scenes, "batch": BATCH, "ceiling": ceiling(args.scenes),
              "cost": {}}
    for grid_name, figures in result["ceiling"].items():
        print(f"| ceiling {grid_name} | pointing {figures['pointing']:.3f} | mIoU {figures['miou']:.3f} |", flush=True)
    for name, build in ARCHITECTURES.items():
        result["cost"][name] = {f"{g}x{g}": step_seconds(build, g, args.steps) for g, _ in GRIDS}
        coarse, fine = result["cost"][name]["8x8"], result["cost"][name]["16x16"]
        print(f"| {name} | 8x8 {coarse['step_s']:.3f} s | 16x16 {fine['step_s']:.3f} s "
              f"({fine['step_s'] / coarse['step_s']:.1f}x) |", flush=True)
    save_json(result, args.json)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
