"""What a detector backend returns, and the interface a backend offers: a leaf module.

The two backends (`extract.torchvision_backend`, `extract.detectron2_backend`), the
region selection (`extract.boxes`) and the factory (`extract.detector`) all need these
types; keeping them here, below all four, means no module has to import the factory
that imports it back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor


@dataclass
class RoIOutputs:
    """The detector's output for one image, one row per RoI (R RoIs, C classes, A attributes)."""

    boxes: Tensor  # (R, 4) x1 y1 x2 y2 in resized-image pixels
    class_probs: Tensor  # (R, C + 1) softmax over classes, background last
    attr_probs: Tensor  # (R, A + 1) softmax over attributes, "no attribute" last
    features: Tensor  # (R, 2048) res5 output mean-pooled over the 14x14 RoI grid


class RegionDetector(Protocol):
    """What `extract.run` needs from a backend."""

    name: str

    def __call__(self, images: Tensor, image_sizes: list[tuple[int, int]]) -> list[RoIOutputs]:
        """images (N, 3, H, W) padded batch; image_sizes (h, w) of each unpadded image → N RoIOutputs."""
        ...
