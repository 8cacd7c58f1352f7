"""Choosing the regions to keep, as the original bottom-up-attention tool did (``generate_tsv.py``).

For every object class, NMS (IoU 0.3) runs over the RoIs scored by that
class; a RoI's confidence is its best score among the classes for which it
survived. The regions kept are the top 36 by confidence (fixed mode) or, in
adaptive mode, those whose confidence reaches 0.2, at least 10 and at most
100. The boxes are the RoIs themselves, which the features were pooled from
(the original ignores the class-specific box regression for this reason).

Per-class NMS over 1600 classes x 300 RoIs is the costly part. Entries below
a score floor cannot change the confidence of any RoI whose confidence is
above the floor (NMS only ever suppresses a box in favour of a higher-scoring
one of the same class), so NMS runs first on the entries above a floor and
lowers the floor only while too few RoIs are certain: the result is exactly
that of NMS over every entry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from extract.roi_outputs import RoIOutputs


@dataclass
class Regions:
    """The kept regions of one image, best first (k regions)."""

    index: Tensor  # (k,) rows of the RoIOutputs they came from
    boxes: Tensor  # (k, 4) x1 y1 x2 y2 in resized-image pixels
    features: Tensor  # (k, 2048)
    confidence: Tensor  # (k,) best class score that survived its class's NMS
    object_ids: Tensor  # (k,) argmax over the object classes (background excluded)
    object_scores: Tensor  # (k,) that class's probability
    attr_ids: Tensor  # (k,) argmax over the attributes ("no attribute" excluded)
    attr_scores: Tensor  # (k,) that attribute's probability


def nms_confidence(boxes: Tensor, scores: Tensor, iou_threshold: float, certain: int, floor: float = 0.01
                   ) -> Tensor:
    """Per RoI, the best class score that survives per-class NMS: boxes (R, 4), scores (R, C) → (R,).

    Exact for every RoI whose confidence is at least the final floor, and the
    floor is lowered until at least ``certain`` RoIs are above it (or it is 0).
    """
    num_rois = boxes.shape[0]
    confidence = scores.new_zeros(num_rois)
    certain = min(certain, num_rois)
    while True:
        rows, classes = torch.nonzero(scores >= floor if floor > 0 else torch.ones_like(scores, dtype=torch.bool),
                                      as_tuple=True)
        values = scores[rows, classes]
        keep = batched_nms(boxes[rows].float(), values.float(), classes, iou_threshold)
        confidence = scores.new_zeros(num_rois).scatter_reduce(0, rows[keep], values[keep], reduce="amax")
        if floor <= 0 or int((confidence >= floor).sum()) >= certain:
            return confidence
        floor = floor / 10 if floor > 1e-6 else 0.0


def select_regions(outputs: RoIOutputs, *, mode: str = "fixed", num_boxes: int = 36, min_boxes: int = 10,
                   max_boxes: int = 100, conf_threshold: float = 0.2, nms_threshold: float = 0.3) -> Regions:
    """The regions the original tool keeps from one image's RoIs (see the module docstring)."""
    object_probs = outputs.class_probs[:, :-1]  # (R, C): the background column is last
    if mode == "fixed":
        certain, floor = num_boxes, 0.01
    elif mode == "adaptive":
        certain, floor = min_boxes, min(0.01, conf_threshold)
    else:
        raise ValueError(f"mode must be 'fixed' or 'adaptive', not {mode!r}")
    confidence = nms_confidence(outputs.boxes, object_probs, nms_threshold, certain, floor)
    # Stable sort on (-confidence, row) so ties keep the RoI order and results are reproducible.
    order = torch.sort(-confidence, stable=True).indices
    if mode == "fixed":
        index = order[:num_boxes]
    else:
        above = int((confidence >= conf_threshold).sum())
        index = order[: min(max(above, min_boxes), max_boxes)]
    object_scores, object_ids = object_probs[index].max(dim=1)
    attr_scores, attr_ids = outputs.attr_probs[index, :-1].max(dim=1)
    return Regions(index=index, boxes=outputs.boxes[index], features=outputs.features[index],
                   confidence=confidence[index], object_ids=object_ids, object_scores=object_scores,
                   attr_ids=attr_ids, attr_scores=attr_scores)
