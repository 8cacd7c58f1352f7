"""The bottom-up-attention detector built from torchvision's ResNet layers and ``roi_pool``/``nms``.

It computes what the detectron2 backend computes (detectron2's anchors, box
decoding, proposal selection and RoI pooling, reproduced here) so that both
give the same RoIs and features for the same weights; a test checks it when
detectron2 is installed. The VG-specific parts of the Caffe model:

- the stem's max-pool has no padding and rounds up (Caffe's ``ceil_mode``);
- strided blocks put the stride on the first 1x1 conv (MSRA/Caffe ResNets);
- the RPN's hidden conv has 512 channels;
- res5 runs on 14x14 RoI-pooled res4 features with stride 1 and dilation 2;
- the attribute head embeds the predicted class (background included),
  concatenates it to the pooled feature and scores 400 attributes + "none".
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import Bottleneck, ResNet
from torchvision.ops import FrozenBatchNorm2d, batched_nms, roi_pool

from extract.config import DetectorConfig
from extract.roi_outputs import RoIOutputs
from extract.weights import BLOCKS_PER_STAGE

FEATURE_STRIDE = 16  # res4 is 1/16 of the input
SCALE_CLAMP = math.log(1000.0 / 16)  # detectron2's cap on predicted log-scale deltas


class CaffeStem(nn.Module):
    """7x7/2 conv, frozen BN, ReLU, then Caffe's 3x3/2 max-pool without padding, rounding up."""

    def __init__(self, *, conv1: nn.Conv2d, bn1: nn.Module) -> None:
        super().__init__()
        self.conv1 = conv1
        self.bn1 = bn1

    def forward(self, x: Tensor) -> Tensor:
        """(N, 3, H, W) → (N, 64, ceil((H/2 - 3)/2) + 1, …)."""
        x = F.relu(self.bn1(self.conv1(x)))
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=0, ceil_mode=True)


class RPNHead(nn.Module):
    """3x3 conv + ReLU, then per-anchor objectness logits and box deltas."""

    def __init__(self, *, conv: nn.Conv2d, objectness_logits: nn.Conv2d, anchor_deltas: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv
        self.objectness_logits = objectness_logits
        self.anchor_deltas = anchor_deltas

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(N, C, H, W) → logits (N, A, H, W), deltas (N, A*4, H, W)."""
        hidden = F.relu(self.conv(x))
        return self.objectness_logits(hidden), self.anchor_deltas(hidden)


def cell_anchors(sizes: tuple[int, ...], ratios: tuple[float, ...]) -> Tensor:
    """(A, 4) anchors centred on 0 in detectron2's order: sizes outer, ratios (h/w) inner."""
    anchors = []
    for size in sizes:
        for ratio in ratios:
            width = math.sqrt(size**2 / ratio)
            height = ratio * width
            anchors.append([-width / 2, -height / 2, width / 2, height / 2])
    return torch.tensor(anchors, dtype=torch.float32, device="cpu")


def grid_anchors(cells: Tensor, height: int, width: int, stride: int) -> Tensor:
    """(H*W*A, 4) anchors over an H x W feature map, ordered (row, column, anchor)."""
    shift_x = torch.arange(0, width * stride, step=stride, dtype=torch.float32, device=cells.device)
    shift_y = torch.arange(0, height * stride, step=stride, dtype=torch.float32, device=cells.device)
    grid_y, grid_x = torch.meshgrid(shift_y, shift_x, indexing="ij")
    shifts = torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)] * 2, dim=1)  # (H*W, 4)
    return (shifts[:, None, :] + cells[None, :, :]).reshape(-1, 4)


def apply_deltas(deltas: Tensor, boxes: Tensor, weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
                 ) -> Tensor:
    """Boxes (K, 4) moved by R-CNN deltas (K, 4) (dx, dy, dw, dh) → (K, 4), as detectron2's Box2BoxTransform."""
    deltas, boxes = deltas.float(), boxes.float()
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    ctr_x, ctr_y = boxes[:, 0] + 0.5 * widths, boxes[:, 1] + 0.5 * heights
    dx, dy = deltas[:, 0] / weights[0], deltas[:, 1] / weights[1]
    dw = torch.clamp(deltas[:, 2] / weights[2], max=SCALE_CLAMP)
    dh = torch.clamp(deltas[:, 3] / weights[3], max=SCALE_CLAMP)
    pred_x, pred_y = dx * widths + ctr_x, dy * heights + ctr_y
    pred_w, pred_h = torch.exp(dw) * widths, torch.exp(dh) * heights
    return torch.stack([pred_x - 0.5 * pred_w, pred_y - 0.5 * pred_h, pred_x + 0.5 * pred_w, pred_y + 0.5 * pred_h],
                       dim=1)


class RegionProposalNetwork(nn.Module):
    """Anchors → the top RoIs of each image: top-k by objectness, clip, drop empty boxes, NMS, top-k."""

    def __init__(self, *, head: RPNHead, anchors: Tensor, stride: int, pre_nms_topk: int, post_nms_topk: int,
                 nms_threshold: float) -> None:
        super().__init__()
        self.head = head
        self.register_buffer("cell_anchors", anchors, persistent=False)
        self.stride = stride
        self.pre_nms_topk = pre_nms_topk
        self.post_nms_topk = post_nms_topk
        self.nms_threshold = nms_threshold

    def forward(self, features: Tensor, image_sizes: list[tuple[int, int]]) -> list[Tensor]:
        """features (N, C, H, W), image_sizes (h, w) each → N proposal sets (R_i <= post_nms_topk, 4)."""
        logits, deltas = self.head(features)
        n, anchors_per_cell, height, width = logits.shape
        logits = logits.permute(0, 2, 3, 1).reshape(n, -1)  # (N, H*W*A)
        deltas = deltas.view(n, anchors_per_cell, 4, height, width).permute(0, 3, 4, 1, 2).reshape(n, -1, 4)
        anchors = grid_anchors(self.cell_anchors, height, width, self.stride)  # (H*W*A, 4)
        top = min(self.pre_nms_topk, logits.shape[1])
        top_logits, top_index = logits.float().topk(top, dim=1)  # (N, top)
        proposals = []
        for i, (image_h, image_w) in enumerate(image_sizes):
            boxes = apply_deltas(deltas[i, top_index[i]], anchors[top_index[i]])
            scores = top_logits[i]
            finite = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores)
            boxes, scores = boxes[finite], scores[finite]
            boxes = torch.stack([boxes[:, 0].clamp(0, image_w), boxes[:, 1].clamp(0, image_h),
                                 boxes[:, 2].clamp(0, image_w), boxes[:, 3].clamp(0, image_h)], dim=1)
            nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            boxes, scores = boxes[nonempty], scores[nonempty]
            # One "level" as in detectron2, which routes this through batched_nms too.
            keep = batched_nms(boxes, scores, torch.zeros_like(scores, dtype=torch.int64), self.nms_threshold)
            proposals.append(boxes[keep[: self.post_nms_topk]])
        return proposals


class Res5BoxHead(nn.Module):
    """RoI max-pooling of res4 (Caffe's RoIPool) into the stride-1 res5, mean-pooled to one vector per RoI."""

    def __init__(self, *, res5: nn.Module, resolution: int, spatial_scale: float, chunk: int) -> None:
        super().__init__()
        self.res5 = res5
        self.resolution = resolution
        self.spatial_scale = spatial_scale
        self.chunk = chunk

    def forward(self, features: Tensor, boxes: list[Tensor]) -> Tensor:
        """features (N, C, H, W), N box sets (R_i, 4) in input pixels → (ΣR_i, 2048)."""
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)])  # (R, 5)
        pooled = []
        for part in rois.split(self.chunk):  # res5 on 14x14 grids is the memory peak: bound it
            grid = roi_pool(features, part.to(features.dtype), self.resolution, self.spatial_scale)  # (r, C, 14, 14)
            pooled.append(self.res5(grid).mean(dim=(2, 3)))  # (r, 2048)
        if not pooled:
            return features.new_zeros((0, self.res5[-1].conv3.out_channels))
        return torch.cat(pooled)


class AttributePredictor(nn.Module):
    """Class logits (background last) and attribute logits conditioned on the predicted class."""

    def __init__(self, *, cls_score: nn.Linear, bbox_pred: nn.Linear, cls_embedding: nn.Embedding,
                 fc_attr: nn.Linear, attr_score: nn.Linear) -> None:
        super().__init__()
        self.cls_score = cls_score
        # Class-specific box regression of the published model. The original tool keeps the RoIs the
        # features were pooled from, so it is loaded and checked but not applied.
        self.bbox_pred = bbox_pred
        self.cls_embedding = cls_embedding
        self.fc_attr = fc_attr
        self.attr_score = attr_score

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(R, 2048) → class logits (R, C + 1), attribute logits (R, A + 1)."""
        class_logits = self.cls_score(x)
        # The argmax includes the background logit, as the Caffe model's attribute branch does.
        embedded = self.cls_embedding(class_logits.argmax(dim=-1))  # (R, 256)
        hidden = F.relu(self.fc_attr(torch.cat([x, embedded.to(x.dtype)], dim=-1)))  # (R, 512)
        return class_logits, self.attr_score(hidden)


class BottomUpDetector(nn.Module):
    """Backbone (stem..res4) → RPN → RoI pool + res5 → class and attribute heads."""

    name = "torchvision"

    def __init__(self, *, backbone: nn.Module, rpn: RegionProposalNetwork, box_head: Res5BoxHead,
                 box_predictor: AttributePredictor) -> None:
        super().__init__()
        self.backbone = backbone
        self.rpn = rpn
        self.box_head = box_head
        self.box_predictor = box_predictor

    def forward(self, images: Tensor, image_sizes: list[tuple[int, int]]) -> list[RoIOutputs]:
        """images (N, 3, H, W) preprocessed and padded, image_sizes (h, w) unpadded → N RoIOutputs."""
        features = self.backbone(images)  # (N, 1024, H/16, W/16)
        proposals = self.rpn(features, image_sizes)
        pooled = self.box_head(features, proposals)  # (ΣR_i, 2048)
        class_logits, attr_logits = self.box_predictor(pooled)
        counts = [len(p) for p in proposals]
        return [RoIOutputs(boxes=boxes, class_probs=cls.float().softmax(-1), attr_probs=attr.float().softmax(-1),
                           features=feats.float())
                for boxes, cls, attr, feats in zip(proposals, class_logits.split(counts), attr_logits.split(counts),
                                                   pooled.split(counts), strict=True)]


def _caffe_stage(stage: nn.Sequential, dilation: int = 1) -> nn.Sequential:
    """torchvision strides the 3x3 conv; the Caffe model strides the first 1x1. Optionally dilate every 3x3."""
    first = stage[0]
    first.conv1.stride, first.conv2.stride = first.conv2.stride, (1, 1)
    if dilation > 1:  # torchvision leaves the first block of a dilated stage undilated; the VG res5 is not
        for block in stage:
            block.conv2.dilation, block.conv2.padding = (dilation, dilation), (dilation, dilation)
    return stage


def build_modules(config: DetectorConfig) -> BottomUpDetector:
    """The detector's modules with uninitialised weights (to be loaded)."""
    res2, res3, res4 = BLOCKS_PER_STAGE[config.depth]
    resnet = ResNet(Bottleneck, [res2, res3, res4, 3], norm_layer=FrozenBatchNorm2d,
                    replace_stride_with_dilation=[False, False, True])
    backbone = nn.Sequential(OrderedDict(
        stem=CaffeStem(conv1=resnet.conv1, bn1=resnet.bn1), layer1=resnet.layer1,
        layer2=_caffe_stage(resnet.layer2), layer3=_caffe_stage(resnet.layer3)))
    anchors = config.num_anchors
    rpn = RegionProposalNetwork(
        head=RPNHead(conv=nn.Conv2d(1024, config.rpn_hidden, 3, padding=1),
                     objectness_logits=nn.Conv2d(config.rpn_hidden, anchors, 1),
                     anchor_deltas=nn.Conv2d(config.rpn_hidden, 4 * anchors, 1)),
        anchors=cell_anchors(config.anchor_sizes, config.anchor_ratios), stride=FEATURE_STRIDE,
        pre_nms_topk=config.rpn_pre_nms_topk, post_nms_topk=config.rpn_post_nms_topk,
        nms_threshold=config.rpn_nms_threshold)
    box_head = Res5BoxHead(res5=_caffe_stage(resnet.layer4, dilation=2), resolution=config.pooler_resolution,
                           spatial_scale=1.0 / FEATURE_STRIDE, chunk=config.roi_chunk)
    classes, attributes = config.num_classes + 1, config.num_attributes + 1
    box_predictor = AttributePredictor(
        cls_score=nn.Linear(2048, classes), bbox_pred=nn.Linear(2048, 4 * config.num_classes),
        cls_embedding=nn.Embedding(classes, 256), fc_attr=nn.Linear(2048 + 256, 512),
        attr_score=nn.Linear(512, attributes))
    return BottomUpDetector(backbone=backbone, rpn=rpn, box_head=box_head, box_predictor=box_predictor)


_BLOCK_PART = re.compile(r"^(?P<block>\d+)\.(?P<conv>conv[123]|shortcut)\.(?:(?P<norm>norm)\.)?(?P<leaf>\w+)$")


def _block_name(suffix: str) -> str:
    """``0.conv2.norm.running_var`` → ``0.bn2.running_var``; ``0.shortcut.weight`` → ``0.downsample.0.weight``."""
    match = _BLOCK_PART.match(suffix)
    if match is None:
        raise KeyError(suffix)
    block, conv, norm, leaf = match["block"], match["conv"], match["norm"], match["leaf"]
    if conv == "shortcut":
        return f"{block}.downsample.{1 if norm else 0}.{leaf}"
    return f"{block}.{'bn' + conv[-1] if norm else conv}.{leaf}"


def torchvision_name(name: str) -> str:
    """A detectron2 parameter name of the published weights → this module's name."""
    if name.startswith("backbone.stem.conv1."):
        return "backbone.stem." + ("bn1." + name.rsplit(".", 1)[1] if ".norm." in name else "conv1.weight")
    if match := re.match(r"^backbone\.res([234])\.(.+)$", name):
        return f"backbone.layer{int(match[1]) - 1}.{_block_name(match[2])}"
    if name.startswith("roi_heads.res5."):
        return "box_head.res5." + _block_name(name[len("roi_heads.res5."):])
    if name.startswith("proposal_generator.rpn_head."):
        return "rpn.head." + name[len("proposal_generator.rpn_head."):]
    if name.startswith("roi_heads.box_predictor."):
        return "box_predictor." + name[len("roi_heads.box_predictor."):]
    raise KeyError(name)


def build_torchvision_detector(config: DetectorConfig, state: Mapping[str, np.ndarray],
                               device: str | torch.device = "cpu") -> BottomUpDetector:
    """The torchvision-backend detector with the checked published weights loaded, in eval mode."""
    with torch.device("meta"):  # skip random initialisation: every tensor is replaced by the weights
        model = build_modules(config)
    tensors = {torchvision_name(name): torch.from_numpy(np.asarray(value, np.float32)) for name, value in state.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval().to(device)
