"""The bottom-up-attention detector assembled from detectron2's own parts and config system.

detectron2 supplies the meta-architecture (GeneralizedRCNN), the ResNet
blocks with frozen batch norm, the anchor generator, the RPN (its
``RPN.CONV_DIMS`` option gives the 512-channel hidden conv), the RoI pooler
and Res5ROIHeads. Registered here, for the parts where the Visual Genome
model differs from detectron2's:

- ``build_vg_resnet_backbone``: a stem whose max-pool has no padding and
  rounds up, as Caffe's (``VGCaffeStem``);
- ``VGRes5ROIHeads``: res5 with stride 1 and dilation 2 on 14x14 RoI pools,
  and the attribute predictor as its box predictor;
- ``VGAttributePredictor``: detectron2's FastRCNNOutputLayers plus the class
  embedding, hidden layer and attribute scores.

The parameter names are detectron2's, so the published ``.pkl`` loads as it
is. This module imports detectron2 at import time; `extract.detector` imports
it only when the detectron2 backend is asked for.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.config import CfgNode, configurable, get_cfg
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, ROI_HEADS_REGISTRY, build_model
from detectron2.modeling.backbone import ResNet
from detectron2.modeling.backbone.resnet import BottleneckBlock, CNNBlockBase
from detectron2.modeling.roi_heads import Res5ROIHeads
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detectron2.structures import ImageList
from torch import Tensor, nn

from extract.config import DetectorConfig
from extract.roi_outputs import RoIOutputs
from extract.weights import BLOCKS_PER_STAGE


class VGCaffeStem(CNNBlockBase):
    """7x7/2 conv with frozen BN, ReLU, and Caffe's 3x3/2 max-pool (no padding, ceil mode)."""

    def __init__(self, in_channels: int = 3, out_channels: int = 64, norm: str = "FrozenBN") -> None:
        super().__init__(in_channels, out_channels, 4)
        self.conv1 = Conv2d(in_channels, out_channels, kernel_size=7, stride=2, padding=3, bias=False,
                            norm=get_norm(norm, out_channels))

    def forward(self, x: Tensor) -> Tensor:
        """(N, 3, H, W) → (N, 64, ~H/4, ~W/4)."""
        x = F.relu_(self.conv1(x))
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=0, ceil_mode=True)


def build_vg_resnet_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> ResNet:
    """ResNet stem..res4 with the Caffe stem; detectron2's bottleneck blocks, stride in the first 1x1."""
    norm = cfg.MODEL.RESNETS.NORM
    stem = VGCaffeStem(input_shape.channels, cfg.MODEL.RESNETS.STEM_OUT_CHANNELS, norm)
    stages = []
    resnets = cfg.MODEL.RESNETS
    in_channels = resnets.STEM_OUT_CHANNELS
    bottleneck, out_channels = resnets.NUM_GROUPS * resnets.WIDTH_PER_GROUP, resnets.RES2_OUT_CHANNELS
    for index, blocks in enumerate(BLOCKS_PER_STAGE[cfg.MODEL.RESNETS.DEPTH]):
        stride = 1 if index == 0 else 2
        stages.append(ResNet.make_stage(
            BottleneckBlock, blocks, stride_per_block=[stride] + [1] * (blocks - 1), in_channels=in_channels,
            bottleneck_channels=bottleneck, out_channels=out_channels, norm=norm,
            stride_in_1x1=cfg.MODEL.RESNETS.STRIDE_IN_1X1))
        in_channels, bottleneck, out_channels = out_channels, bottleneck * 2, out_channels * 2
    return ResNet(stem, stages, out_features=cfg.MODEL.RESNETS.OUT_FEATURES)


class VGAttributePredictor(FastRCNNOutputLayers):
    """detectron2's box predictor plus the attribute head of the Visual Genome model."""

    @configurable
    def __init__(self, input_shape: ShapeSpec, *, num_attributes: int, **kwargs) -> None:
        super().__init__(input_shape, **kwargs)
        channels = input_shape.channels
        self.cls_embedding = nn.Embedding(self.num_classes + 1, channels // 8)
        self.fc_attr = nn.Linear(channels + channels // 8, channels // 4)
        self.attr_score = nn.Linear(channels // 4, num_attributes + 1)

    @classmethod
    def from_config(cls, cfg: CfgNode, input_shape: ShapeSpec) -> dict:
        return {**super().from_config(cfg, input_shape), "num_attributes": cfg.MODEL.ROI_BOX_HEAD.NUM_ATTRIBUTES}

    def attribute_logits(self, x: Tensor, class_logits: Tensor) -> Tensor:
        """Pooled features (R, 2048) and class logits (R, C + 1) → attribute logits (R, A + 1)."""
        embedded = self.cls_embedding(class_logits.argmax(dim=-1))  # background included, as in Caffe
        return self.attr_score(F.relu(self.fc_attr(torch.cat([x, embedded.to(x.dtype)], dim=-1))))


class VGRes5ROIHeads(Res5ROIHeads):
    """Res5ROIHeads with the VG res5 (stride 1, dilation 2) and the attribute predictor."""

    @classmethod
    def from_config(cls, cfg: CfgNode, input_shape: dict[str, ShapeSpec]) -> dict:
        ret = super().from_config(cfg, input_shape)
        channels = cfg.MODEL.RESNETS.RES2_OUT_CHANNELS * 8
        ret["box_predictor"] = VGAttributePredictor(cfg, ShapeSpec(channels=channels, height=1, width=1))
        return ret

    @classmethod
    def _build_res5_block(cls, cfg: CfgNode) -> tuple[nn.Sequential, int]:
        out_channels = cfg.MODEL.RESNETS.RES2_OUT_CHANNELS * 8
        blocks = ResNet.make_stage(
            BottleneckBlock, 3, stride_per_block=[1, 1, 1], in_channels=out_channels // 2,
            bottleneck_channels=cfg.MODEL.RESNETS.WIDTH_PER_GROUP * 8, out_channels=out_channels,
            norm=cfg.MODEL.RESNETS.NORM, stride_in_1x1=cfg.MODEL.RESNETS.STRIDE_IN_1X1,
            dilation=cfg.MODEL.RESNETS.RES5_DILATION)
        return nn.Sequential(*blocks), out_channels


def register_vg_parts() -> None:
    """Put the VG parts in detectron2's registries (once per process)."""
    if "build_vg_resnet_backbone" not in BACKBONE_REGISTRY:
        BACKBONE_REGISTRY.register(build_vg_resnet_backbone)
    if "VGRes5ROIHeads" not in ROI_HEADS_REGISTRY:
        ROI_HEADS_REGISTRY.register(VGRes5ROIHeads)


def detectron2_config(config: DetectorConfig) -> CfgNode:
    """detectron2's config for the model (faster_rcnn_R_101_C4_attr_caffemaxpool.yaml, our test settings)."""
    cfg = get_cfg()
    cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.MASK_ON = False
    cfg.MODEL.PIXEL_MEAN = list(config.pixel_mean)
    cfg.MODEL.PIXEL_STD = [1.0, 1.0, 1.0]
    cfg.MODEL.BACKBONE.NAME = "build_vg_resnet_backbone"
    cfg.MODEL.RESNETS.DEPTH = config.depth
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = True
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res4"]
    cfg.MODEL.RESNETS.RES5_DILATION = 2
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [list(config.anchor_sizes)]
    cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = [list(config.anchor_ratios)]
    cfg.MODEL.ANCHOR_GENERATOR.OFFSET = 0.0
    cfg.MODEL.RPN.IN_FEATURES = ["res4"]
    cfg.MODEL.RPN.CONV_DIMS = [config.rpn_hidden]
    cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = config.rpn_pre_nms_topk
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = config.rpn_post_nms_topk
    cfg.MODEL.RPN.NMS_THRESH = config.rpn_nms_threshold
    cfg.MODEL.RPN.BBOX_REG_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
    cfg.MODEL.PROPOSAL_GENERATOR.MIN_SIZE = 0
    cfg.MODEL.ROI_HEADS.NAME = "VGRes5ROIHeads"
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["res4"]
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = config.num_classes
    cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE = "ROIPool"
    cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = config.pooler_resolution
    cfg.MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
    cfg.MODEL.ROI_BOX_HEAD.NUM_ATTRIBUTES = config.num_attributes  # our key, read by VGAttributePredictor
    cfg.INPUT.MIN_SIZE_TEST = config.min_size
    cfg.INPUT.MAX_SIZE_TEST = config.max_size
    cfg.INPUT.FORMAT = "BGR"
    return cfg


class Detectron2Detector(nn.Module):
    """GeneralizedRCNN run stage by stage so every RoI's probabilities and pooled feature come out."""

    name = "detectron2"

    def __init__(self, *, model: nn.Module, roi_chunk: int) -> None:
        super().__init__()
        self.model = model
        self.roi_chunk = roi_chunk

    def forward(self, images: Tensor, image_sizes: list[tuple[int, int]]) -> list[RoIOutputs]:
        """images (N, 3, H, W) preprocessed and padded, image_sizes (h, w) unpadded → N RoIOutputs."""
        features = self.model.backbone(images)  # {"res4": (N, 1024, H/16, W/16)}
        proposals, _ = self.model.proposal_generator(ImageList(images, image_sizes), features, None)
        heads = self.model.roi_heads
        boxes = [p.proposal_boxes for p in proposals]
        grids = heads.pooler([features[f] for f in heads.in_features], boxes)  # (ΣR_i, 1024, 14, 14)
        pooled = torch.cat([heads.res5(part).mean(dim=(2, 3)) for part in grids.split(self.roi_chunk)]) \
            if len(grids) else grids.new_zeros((0, heads.box_predictor.cls_score.in_features))  # (ΣR_i, 2048)
        class_logits, _ = heads.box_predictor(pooled)
        attr_logits = heads.box_predictor.attribute_logits(pooled, class_logits)
        counts = [len(b) for b in boxes]
        return [RoIOutputs(boxes=b.tensor, class_probs=c.float().softmax(-1), attr_probs=a.float().softmax(-1),
                           features=f.float())
                for b, c, a, f in zip(boxes, class_logits.split(counts), attr_logits.split(counts),
                                      pooled.split(counts), strict=True)]


def build_detectron2_detector(config: DetectorConfig, state: Mapping[str, np.ndarray],
                              device: str | torch.device = "cpu") -> Detectron2Detector:
    """The detectron2-backend detector with the checked published weights loaded, in eval mode."""
    register_vg_parts()
    model = build_model(detectron2_config(config))
    model.load_state_dict({name: torch.from_numpy(np.asarray(value, np.float32)) for name, value in state.items()},
                          strict=True)
    return Detectron2Detector(model=model, roi_chunk=config.roi_chunk).eval().to(device)
