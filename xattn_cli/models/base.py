"""What every adapter shares: the wrapped model, its device, image preprocessing, and its `Layout`."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

from xattn_cli.models.layout import Layout


def normalize(images: np.ndarray | torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (B, H, W, 3) → normalised float (B, 3, H, W)."""
    pixels = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255.0  # (B, 3, H, W)
    return (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


class Adapter:
    """A model in eval mode, with the preprocessing its weights expect."""

    family: str
    layout: Layout
    name: str
    mean: Sequence[float]
    std: Sequence[float]

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> "Adapter":
        self.model.to(device)
        return self

    def preprocess(self, images: Sequence[Image.Image], size: tuple[int, int]) -> torch.Tensor:
        """Squash each image to (H, W), bicubic, no crop: the map covers the whole image. (B, 3, H, W)."""
        height, width = size
        arrays = np.stack([np.asarray(image.convert("RGB").resize((width, height), Image.BICUBIC)) for image in images])
        return normalize(arrays, self.mean, self.std).to(self.device)
