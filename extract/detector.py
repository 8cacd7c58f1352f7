"""One interface over the two backends of the bottom-up-attention detector.

Both backends take a padded batch of preprocessed images (BGR, mean
subtracted, see `extract.images`) and return, per image, every RoI the RPN
proposed with its class and attribute probabilities and its 2048-d pooled
feature. Choosing the regions to keep is shared code (`extract.boxes`), so
the backends differ only in how the network is built. The output types live in
`extract.roi_outputs`, below the backends, which therefore never import this
factory (it imports them).

- ``torchvision``: our modules around torchvision's ResNet-101 layers and
  ``roi_pool``/``nms``; installs everywhere; what CI tests.
- ``detectron2``: the network from detectron2's own parts and config system,
  with our VG stem, res5 and attribute predictor registered into it.
"""

from __future__ import annotations

import torch

from extract.config import DetectorConfig, ExtractError
from extract.roi_outputs import RegionDetector
from extract.weights import LoadedWeights


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
