"""The detector against a forward pass written independently from the raw weights, and the backends against each other.

`reference_forward` below uses nothing of `extract` but the weights dict: it
walks the published parameter names, runs every convolution with
``F.conv2d``, enumerates anchors with loops, and scores attributes by hand.
Agreement checks the wiring of the VG parts (Caffe stem, stride in the 1x1,
512-channel RPN, anchor order, dilated stride-1 res5, background-last class
scores, class-conditioned attribute head), not only the shapes.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import nms, roi_pool

from extract.boxes import select_regions
from extract.config import DetectorConfig
from extract.detector import build_detector
from extract.images import DecodedImage, prepare_image
from extract.run import pad_batch
from extract.weights import load_weights
from tests.extract_fixtures import published_weights, scene  # noqa: F401 - fixture

CONFIG = DetectorConfig(min_size=160, max_size=240, rpn_post_nms_topk=50)


# --------------------------------------------------------------------------- an independent forward pass


def _t(weights: dict[str, np.ndarray], name: str) -> torch.Tensor:
    return torch.from_numpy(weights[name])


def _conv_bn(x, w, name, stride=1, padding=0, dilation=1, relu=True):
    x = F.conv2d(x, _t(w, f"{name}.weight"), None, stride, padding, dilation)
    scale = _t(w, f"{name}.norm.weight") / torch.sqrt(_t(w, f"{name}.norm.running_var") + 1e-5)
    shift = _t(w, f"{name}.norm.bias") - _t(w, f"{name}.norm.running_mean") * scale
    x = x * scale[None, :, None, None] + shift[None, :, None, None]
    return F.relu(x) if relu else x


def _bottleneck(x, w, name, stride, dilation=1):
    out = _conv_bn(x, w, f"{name}.conv1", stride=stride)  # Caffe ResNets stride the first 1x1
    out = _conv_bn(out, w, f"{name}.conv2", padding=dilation, dilation=dilation)
    out = _conv_bn(out, w, f"{name}.conv3", relu=False)
    shortcut = _conv_bn(x, w, f"{name}.shortcut", stride=stride, relu=False) if f"{name}.shortcut.weight" in w else x
    return F.relu(out + shortcut)


def reference_forward(w: dict[str, np.ndarray], image: torch.Tensor, image_size: tuple[int, int],
                      config: DetectorConfig) -> dict[str, torch.Tensor]:
    """One image (1, 3, H, W) → RoIs (R, 4), class probs (R, 1601), attribute probs (R, 401), features (R, 2048)."""
    x = _conv_bn(image, w, "backbone.stem.conv1", stride=2, padding=3)
    x = F.max_pool2d(x, 3, 2, 0, ceil_mode=True)
    for stage, blocks in ((2, 3), (3, 4), (4, 23)):
        for block in range(blocks):
            x = _bottleneck(x, w, f"backbone.res{stage}.{block}", stride=2 if block == 0 and stage > 2 else 1)
    features = x  # (1, 1024, h, w)

    hidden = F.relu(F.conv2d(features, _t(w, "proposal_generator.rpn_head.conv.weight"),
                             _t(w, "proposal_generator.rpn_head.conv.bias"), padding=1))
    logits = F.conv2d(hidden, _t(w, "proposal_generator.rpn_head.objectness_logits.weight"),
                      _t(w, "proposal_generator.rpn_head.objectness_logits.bias"))[0]  # (A, h, w)
    deltas = F.conv2d(hidden, _t(w, "proposal_generator.rpn_head.anchor_deltas.weight"),
                      _t(w, "proposal_generator.rpn_head.anchor_deltas.bias"))[0]  # (4A, h, w)
    cells = [(math.sqrt(size * size / ratio), ratio * math.sqrt(size * size / ratio))
             for size in config.anchor_sizes for ratio in config.anchor_ratios]
    scores, boxes = [], []
    for y in range(features.shape[2]):
        for x_ in range(features.shape[3]):
            for a, (aw, ah) in enumerate(cells):
                cx, cy = x_ * 16.0, y * 16.0  # anchor centres on the stride-16 grid, no offset
                dx, dy, dw, dh = deltas[4 * a: 4 * a + 4, y, x_].tolist()
                dw, dh = min(dw, math.log(1000 / 16)), min(dh, math.log(1000 / 16))
                px, py, pw, ph = cx + dx * aw, cy + dy * ah, aw * math.exp(dw), ah * math.exp(dh)
                boxes.append([px - pw / 2, py - ph / 2, px + pw / 2, py + ph / 2])
                scores.append(logits[a, y, x_].item())
    scores, boxes = torch.tensor(scores), torch.tensor(boxes)
    top = scores.argsort(descending=True)[: config.rpn_pre_nms_topk]
    scores, boxes = scores[top], boxes[top]
    height, width = image_size
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    scores, boxes = scores[nonempty], boxes[nonempty]
    rois = boxes[nms(boxes, scores, config.rpn_nms_threshold)[: config.rpn_post_nms_topk]]

    x = roi_pool(features, [rois], config.pooler_resolution, 1 / 16)
    for block in range(3):
        x = _bottleneck(x, w, f"roi_heads.res5.{block}", stride=1, dilation=2)
    pooled = x.mean(dim=(2, 3))
    head = "roi_heads.box_predictor"
    class_logits = pooled @ _t(w, f"{head}.cls_score.weight").T + _t(w, f"{head}.cls_score.bias")
    embedded = _t(w, f"{head}.cls_embedding.weight")[class_logits.argmax(dim=1)]
    attr_hidden = F.relu(torch.cat([pooled, embedded], 1) @ _t(w, f"{head}.fc_attr.weight").T
                         + _t(w, f"{head}.fc_attr.bias"))
    attr_logits = attr_hidden @ _t(w, f"{head}.attr_score.weight").T + _t(w, f"{head}.attr_score.bias")
    return {"boxes": rois, "class_probs": class_logits.softmax(1), "attr_probs": attr_logits.softmax(1),
            "features": pooled}


def _prepared(seed: int, height: int, width: int, config: DetectorConfig = CONFIG):
    image = scene(height, width, seed)
    return prepare_image(DecodedImage(image[:, :, ::-1].copy(), (height, width)), config.min_size, config.max_size,
                         config.pixel_mean)


@pytest.fixture(scope="module")
def weights(published_weights):  # noqa: F811 - the imported fixture
    return load_weights(published_weights, DetectorConfig())


def test_torchvision_detector_matches_an_independent_forward_pass(weights):
    prepared = _prepared(seed=11, height=150, width=200)
    image = torch.from_numpy(prepared.tensor)[None]
    size = tuple(prepared.tensor.shape[1:])
    detector = build_detector("torchvision", CONFIG, weights)
    with torch.inference_mode():
        got = detector(image, [size])[0]
        expected = reference_forward(weights.state, image, size, CONFIG)
    assert len(expected["boxes"]) == CONFIG.rpn_post_nms_topk  # the random weights give a full set of RoIs
    torch.testing.assert_close(got.boxes, expected["boxes"], atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(got.features, expected["features"], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(got.class_probs, expected["class_probs"], atol=1e-5, rtol=1e-3)
    torch.testing.assert_close(got.attr_probs, expected["attr_probs"], atol=1e-5, rtol=1e-3)
    # The features are not degenerate: RoIs differ from each other.
    assert got.features.std(dim=0).mean() > 1e-2


def test_a_batch_gives_each_image_its_own_rois(weights):
    """Two images of different sizes in one padded batch: RoIs stay inside each image's own size."""
    first, second = _prepared(1, 120, 200), _prepared(2, 200, 130)
    tensors = [torch.from_numpy(p.tensor) for p in (first, second)]
    sizes = [tuple(t.shape[1:]) for t in tensors]
    detector = build_detector("torchvision", CONFIG, weights)
    with torch.inference_mode():
        outputs = detector(pad_batch(tensors), sizes)
    for output, (height, width) in zip(outputs, sizes, strict=True):
        assert len(output.boxes) > 36
        assert (output.boxes[:, 0::2] <= width).all() and (output.boxes[:, 1::2] <= height).all()
        assert (output.boxes >= 0).all()
        torch.testing.assert_close(output.class_probs.sum(1), torch.ones(len(output.boxes)))


def test_detectron2_and_torchvision_backends_agree(weights):
    pytest.importorskip("detectron2", reason="the detectron2 backend is checked only where detectron2 is built "
                                             "(it is not on PyPI)")
    tensors = [torch.from_numpy(_prepared(seed, h, w).tensor) for seed, h, w in ((3, 150, 200), (4, 200, 140))]
    sizes = [tuple(t.shape[1:]) for t in tensors]
    batch = pad_batch(tensors)
    torchvision_detector = build_detector("torchvision", CONFIG, weights)
    detectron2_detector = build_detector("detectron2", CONFIG, weights)
    with torch.inference_mode():
        ours, theirs = torchvision_detector(batch, sizes), detectron2_detector(batch, sizes)
    for a, b in zip(ours, theirs, strict=True):
        assert a.boxes.shape == b.boxes.shape
        print("max abs diff: boxes", (a.boxes - b.boxes).abs().max().item(),
              "features", (a.features - b.features).abs().max().item(),
              "class probs", (a.class_probs - b.class_probs).abs().max().item())
        torch.testing.assert_close(a.boxes, b.boxes, atol=1e-3, rtol=0)
        torch.testing.assert_close(a.features, b.features, atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(a.class_probs, b.class_probs, atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(a.attr_probs, b.attr_probs, atol=1e-4, rtol=1e-3)
        regions_a, regions_b = select_regions(a), select_regions(b)
        assert torch.equal(regions_a.index, regions_b.index)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_half_precision_on_gpu_matches_float32(weights):
    """float16 autocast keeps the regions and features of float32 on the same images (GPU only)."""
    from torchvision.ops import box_iou

    tensors = [torch.from_numpy(_prepared(seed, 150, 200).tensor) for seed in (5, 6, 7)]
    sizes = [tuple(t.shape[1:]) for t in tensors]
    detector = build_detector("torchvision", CONFIG, weights, "cuda")
    batch = pad_batch(tensors).cuda()
    with torch.inference_mode():
        full = [select_regions(o) for o in detector(batch, sizes)]
        with torch.autocast("cuda", dtype=torch.float16):
            half = [select_regions(o) for o in detector(batch, sizes)]
    for a, b in zip(full, half, strict=True):
        iou = box_iou(a.boxes, b.boxes)
        best, match = iou.max(dim=1)
        assert (best > 0.9).float().mean() >= 0.9
        cosine = F.cosine_similarity(a.features[best > 0.9], b.features[match[best > 0.9]], dim=1)
        assert cosine.mean() > 0.99
