"""Learned token masks (`xattn mask`): for each image and target, the patches of a fixed budget that keep the
model's decision when attention sees only them (`capture.TokenMask`, `methods.token_mask`; reference/meat.md).

Objectives, maximised: multi-label classifiers log σ(z_t) (shapes-vit is sigmoid multi-label), single-label
classifiers log softmax_t, CLIP logit_scale · cos(image, text). Recorded scores are the logit (classifiers)
or the cosine similarity (CLIP) with every patch, with the kept patches only, and with them removed.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from xattn_cli.capture import TokenMask
from xattn_cli.capture.gradients import frozen_parameters
from xattn_cli.errors import UsageError
from xattn_cli.explainers.base import Explainer, check_finite, checked_texts
from xattn_cli.methods.token_mask import MaskSettings, item_seed, optimise_mask
from xattn_cli.results import TargetMap

TASKS = ("classify", "image-text")


class MaskExplainer(Explainer):
    """One binary patch mask per (image, target): a ViT classifier's classes or a CLIP model's texts."""

    def __init__(self, adapter, *, targets: Sequence[str] = (), texts: Sequence[str] = (),
                 settings: MaskSettings = MaskSettings(), seed: int = 0):
        layout = getattr(adapter, "layout", None)
        if layout is None or "mask" not in layout.explainers:
            raise UsageError(f"{adapter.name} has no token-mask support (ViT classifiers and CLIP ViT models have)")
        super().__init__(adapter, "mask")
        self.task = layout.task
        if self.task == "image-text":
            if targets:
                raise UsageError(f"{adapter.name} is a CLIP model: give texts, not targets")
            self.texts = checked_texts(texts)
        elif texts:
            raise UsageError(f"{adapter.name} is a classifier: give targets, not texts")
        self.fixed_targets = [adapter.target_index(t) for t in targets] if self.task == "classify" else []
        if not 0 < settings.ratio <= 1 or settings.steps < 1:
            raise UsageError(f"keep ratio must be in (0, 1] and steps at least 1, got {settings.ratio} and {settings.steps}")
        self.settings, self.seed = settings, seed
        self.sites = [site for site in adapter.attention_sites() if site.stream == "vision"]
        self.prefix = layout.prefix_tokens
        self.grid = adapter.grid() if self.task == "classify" else adapter.grid(adapter.native_size)

    def meta(self) -> dict[str, Any]:
        s = self.settings
        return {**super().meta(), "keep_ratio": s.ratio, "steps": s.steps, "alpha": s.alpha, "lr": s.lr,
                "tau": list(s.tau), "seed": self.seed}

    # --- scores of rows (image, target) ---------------------------------------------------------
    def _targets(self, pixels: torch.Tensor) -> list[list[int]]:
        """Per image: class indices (given, or the predicted ones) or text indices."""
        if self.task == "image-text":
            return [list(range(len(self.texts)))] * pixels.shape[0]
        if self.fixed_targets:
            return [self.fixed_targets] * pixels.shape[0]
        with torch.no_grad():
            logits = self.adapter.classify(pixels).float()  # (B, C)
        check_finite(logits)
        if self.adapter.multi_label:
            chosen = [torch.nonzero(row > 0).flatten().tolist() for row in logits]
            return [c or [int(row.argmax())] for c, row in zip(chosen, logits)]
        return [[int(row.argmax())] for row in logits]

    def _scores(self, pixels: torch.Tensor, targets: torch.Tensor,
                keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(objective, reported score), each (R,), of R rows; `keep` (R, N) over the patches, or None for all."""
        rows = torch.arange(len(targets))
        if keep is None:
            keep = torch.ones(len(targets), self.grid[0] * self.grid[1], device=pixels.device)
        keep = torch.cat([torch.ones_like(keep[:, : self.prefix]), keep], dim=1)  # (R, prefix + N)
        with TokenMask(self.sites, keep, prefix=self.prefix):
            if self.task == "image-text":
                image = F.normalize(self.adapter.encode_image(pixels).float(), dim=-1)  # (R, E)
                similarity = (image * self.text_embeddings[targets]).sum(dim=-1)  # (R,)
                return self.adapter.logit_scale * similarity, similarity
            logits = self.adapter.classify(pixels).float()  # (R, C)
        chosen = logits[rows, targets]  # (R,)
        if self.adapter.multi_label:
            return F.logsigmoid(chosen), chosen
        return logits.log_softmax(dim=-1)[rows, targets], chosen

    # --- explain -----------------------------------------------------------------------------------
    def explain(self, images: Sequence[Image.Image], names: Sequence[str] = ()) -> list[list[TargetMap]]:
        adapter = self.adapter
        pixels = adapter.preprocess(images, adapter.native_size)  # (B, 3, H, W)
        if self.task == "image-text":
            self.text_embeddings = adapter.text_embeddings(self.texts, ensemble=False, disk_cache=False).clone()  # (K, E)
        per_image = self._targets(pixels)
        rows = [(i, t) for i, targets in enumerate(per_image) for t in targets]
        row_pixels = pixels[[i for i, _ in rows]]  # (R, 3, H, W)
        targets = torch.tensor([t for _, t in rows], device=pixels.device)  # (R,)
        seeds = [item_seed(self.seed, _content(images[i]), self._name(t)) for i, t in rows]
        with frozen_parameters(adapter.model), torch.enable_grad():
            learned = optimise_mask(lambda keep: self._scores(row_pixels, targets, keep)[0],
                                    self.grid[0] * self.grid[1], seeds, self.settings, pixels.device)
        with torch.no_grad():
            score = self._scores(row_pixels, targets, None)[1]
            kept = learned.kept.to(pixels.dtype)  # (R, N)
            score_kept = self._scores(row_pixels, targets, kept)[1]
            score_removed = self._scores(row_pixels, targets, 1 - kept)[1]
        check_finite(score, "scores")
        results: list[list[TargetMap]] = [[] for _ in images]
        for r, (i, t) in enumerate(rows):
            extra = {"kept": round(float(learned.kept[r].float().mean()), 6),
                     "kept_threshold": round(float(learned.threshold_fraction[r]), 6),
                     "kept_tokens": learned.kept[r].nonzero().flatten().tolist(),
                     "score_kept": round(float(score_kept[r]), 6), "score_removed": round(float(score_removed[r]), 6),
                     "steps": self.settings.steps, "seed": self.seed}
            if self.task == "classify":
                extra = {"label": adapter.labels[t], "index": t, **extra}
            binary = _binary_map(learned.kept[r], self.grid, images[i])
            results[i].append(TargetMap(self._name(t), float(score[r]), binary, False, extra))
        return results

    def _name(self, target: int) -> str:
        return self.texts[target] if self.task == "image-text" else self.adapter.labels[target]


def _content(image: Image.Image) -> bytes:
    """What identifies an image's pixels, for its noise seed."""
    return f"{image.mode}{image.size}".encode() + image.tobytes()


def _binary_map(kept: torch.Tensor, grid: tuple[int, int], image: Image.Image):
    """(N,) kept patches, row-major on `grid` → (H, W) float32 0/1 numpy map at the image's size (the model
    input is the whole image squashed, so each patch covers its share of the image)."""
    patches = kept.float().reshape(1, 1, *grid)  # (1, 1, gh, gw)
    return F.interpolate(patches, size=(image.height, image.width), mode="nearest-exact")[0, 0].cpu().numpy()
