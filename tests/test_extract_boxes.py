"""Region selection against a direct transcription of the original tool's loop (generate_tsv.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from extract.boxes import nms_confidence, select_regions
from extract.roi_outputs import RoIOutputs


def greedy_nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    """Plain greedy NMS (py-faster-rcnn's, without the +1 pixel convention)."""
    order = list(np.argsort(-scores, kind="stable"))
    keep = []
    while order:
        i = order.pop(0)
        keep.append(i)
        rest = []
        for j in order:
            ix1, iy1 = max(boxes[i, 0], boxes[j, 0]), max(boxes[i, 1], boxes[j, 1])
            ix2, iy2 = min(boxes[i, 2], boxes[j, 2]), min(boxes[i, 3], boxes[j, 3])
            inter = max(ix2 - ix1, 0) * max(iy2 - iy1, 0)
            area_i = (boxes[i, 2] - boxes[i, 0]) * (boxes[i, 3] - boxes[i, 1])
            area_j = (boxes[j, 2] - boxes[j, 0]) * (boxes[j, 3] - boxes[j, 1])
            if inter / (area_i + area_j - inter) <= threshold:
                rest.append(j)
        order = rest
    return keep


def reference_selection(boxes, probs, mode, num_boxes=36, min_boxes=10, max_boxes=100, conf=0.2, nms=0.3):
    """The original: per-class NMS, max_conf, then top-k or threshold with 10..100 bounds."""
    max_conf = np.zeros(len(boxes))
    for cls in range(probs.shape[1] - 1):  # background last here (first in Caffe)
        scores = probs[:, cls]
        keep = greedy_nms(boxes, scores, nms)
        max_conf[keep] = np.maximum(max_conf[keep], scores[keep])
    order = np.argsort(-max_conf, kind="stable")
    if mode == "fixed":
        return order[:num_boxes], max_conf
    above = int((max_conf >= conf).sum())
    return order[: min(max(above, min_boxes), max_boxes)], max_conf


def random_outputs(rois: int, classes: int, sharpness: float, seed: int) -> RoIOutputs:
    generator = torch.Generator().manual_seed(seed)
    xy = torch.rand((rois, 2), generator=generator) * 200
    wh = torch.rand((rois, 2), generator=generator) * 80 + 5
    boxes = torch.cat([xy, xy + wh], dim=1)
    logits = torch.randn((rois, classes + 1), generator=generator) * sharpness
    return RoIOutputs(boxes=boxes, class_probs=logits.softmax(1),
                      attr_probs=torch.randn((rois, 9), generator=generator).softmax(1),
                      features=torch.randn((rois, 16), generator=generator))


@pytest.mark.parametrize("sharpness", [0.3, 3.0, 8.0])  # flat scores force the floor down to 0; peaked ones do not
@pytest.mark.parametrize("mode", ["fixed", "adaptive"])
def test_selection_matches_the_original_loop(mode, sharpness):
    outputs = random_outputs(rois=80, classes=25, sharpness=sharpness, seed=int(sharpness * 10))
    regions = select_regions(outputs, mode=mode, num_boxes=12, min_boxes=5, max_boxes=30)
    expected, max_conf = reference_selection(outputs.boxes.numpy().astype(np.float64), outputs.class_probs.numpy(),
                                             mode, num_boxes=12, min_boxes=5, max_boxes=30)
    assert regions.index.tolist() == expected.tolist()
    np.testing.assert_allclose(regions.confidence.numpy(), max_conf[expected], rtol=1e-6)
    torch.testing.assert_close(regions.boxes, outputs.boxes[regions.index])
    torch.testing.assert_close(regions.features, outputs.features[regions.index])
    fg = outputs.class_probs[regions.index, :-1]
    assert regions.object_ids.tolist() == fg.argmax(1).tolist()  # background never an object label
    assert regions.attr_ids.max() < outputs.attr_probs.shape[1] - 1  # "no attribute" never an attribute label
    torch.testing.assert_close(regions.attr_scores, outputs.attr_probs[regions.index, :-1].max(1).values)


def test_adaptive_mode_keeps_the_confident_regions_within_bounds():
    outputs = random_outputs(rois=150, classes=10, sharpness=6.0, seed=3)
    confident = select_regions(outputs, mode="adaptive", min_boxes=10, max_boxes=100, conf_threshold=0.2)
    assert 10 <= len(confident.index) <= 100
    above = int((nms_confidence(outputs.boxes, outputs.class_probs[:, :-1], 0.3, 150, 0.0) >= 0.2).sum())
    assert len(confident.index) == min(max(above, 10), 100)
    few = select_regions(outputs, mode="adaptive", min_boxes=10, max_boxes=100, conf_threshold=1.5)
    assert len(few.index) == 10  # nothing reaches the threshold: the minimum
    many = select_regions(outputs, mode="adaptive", min_boxes=10, max_boxes=12, conf_threshold=0.0)
    assert len(many.index) == 12  # everything reaches it: the maximum


def test_floor_gives_the_exact_confidence_of_every_certain_roi():
    outputs = random_outputs(rois=60, classes=40, sharpness=2.0, seed=7)
    scores = outputs.class_probs[:, :-1]
    exact = nms_confidence(outputs.boxes, scores, 0.3, certain=60, floor=0.0)
    pruned = nms_confidence(outputs.boxes, scores, 0.3, certain=5, floor=0.05)
    certain = pruned >= 0.05
    assert certain.sum() >= 5
    torch.testing.assert_close(pruned[certain], exact[certain])
    assert (pruned[~certain] <= exact[~certain]).all()


def test_fewer_rois_than_requested_keeps_them_all():
    outputs = random_outputs(rois=7, classes=5, sharpness=1.0, seed=1)
    assert len(select_regions(outputs, mode="fixed", num_boxes=36).index) == 7
    empty = RoIOutputs(boxes=torch.zeros((0, 4)), class_probs=torch.zeros((0, 6)), attr_probs=torch.zeros((0, 9)),
                       features=torch.zeros((0, 16)))
    assert len(select_regions(empty, mode="fixed").index) == 0
