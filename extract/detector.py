"""One interface over the two backends of the bottom-up-attention detector.

Both backends take a padded batch of preprocessed images (BGR, mean
subtracted, see `extract.images`) and return, per image, every RoI the RPN
proposed with its class and attribute probabilities and its 2048-d pooled
feature. Choosing the regions to keep is shared code (`extract.boxes`), so
the backends differ only in how the network is built.

- ``torchvision``: our modules around torchvision's ResNet-101 layers and
  ``roi_pool``/``nms``; installs everywhere; what CI tests.
- ``detectron2``: the network from detectron2's own parts and config system,
  with our VG stem, res5 and attribute predictor registered into it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from extract.config import DetectorConfig, ExtractError
from extract.weights import LoadedWeights


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


def detectron2_available() -> bool:
    """True when detectron2 can be imported (it is looked up without being imported)."""
    import importlib.util

    try:
        return importlib.util.find_spec("detectron2") is not None
    except (ImportError, ValueError):  # a broken installation counts as none
        return False


def resolve_backend(backend: str) -> str:
    """"auto" → detectron2 when importable, else torchvision; a named backend is checked."""
    if backend == "auto":
        return "detectron2" if detectron2_available() else "torchvision"
    if backend == "detectron2" and not detectron2_available():
        raise ExtractError("--backend detectron2: detectron2 is not installed; build it from source "
                           "(see extract/README.md) or use --backend torchvision")
    if backend not in ("torchvision", "detectron2"):
        raise ValueError(f"unknown backend {backend!r}")
    return backend


def build_detector(backend: str, config: DetectorConfig, weights: LoadedWeights,
                   device: str | torch.device = "cpu") -> RegionDetector:
    """The named backend's detector with `weights` loaded, in eval mode on `device`."""
    backend = resolve_backend(backend)
    if backend == "detectron2":
        from extract.detectron2_backend import build_detectron2_detector

        return build_detectron2_detector(config, weights.state, device)
    from extract.torchvision_backend import build_torchvision_detector

    return build_torchvision_detector(config, weights.state, device)
