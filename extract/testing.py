"""Random weights in the published layout, for tests and benchmarks (nothing is downloaded).

Random convolutions under frozen batch norm make a ResNet's activations
explode, and an RPN fed exploded features proposes a handful of image-sized
boxes. So the convolutions are He-normal, each residual branch is damped, the
heads get small weights, and every batch norm takes the statistics of its
input in one calibration pass over a synthetic image (a pre-hook sets them
just before the layer runs, so each layer sees already-calibrated inputs).
The result has realistic properties: ~300 distinct RoIs, peaked class
scores, finite features.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from extract.config import DetectorConfig
from extract.weights import expected_shapes


def _calibration_image(config: DetectorConfig, generator: torch.Generator) -> torch.Tensor:
    """(1, 3, 256, 320) smooth random colours, mean-subtracted like a real input."""
    coarse = torch.rand((1, 3, 8, 10), generator=generator) * 255.0
    image = F.interpolate(coarse, size=(256, 320), mode="bilinear", align_corners=False)
    image = image + torch.randn(image.shape, generator=generator) * 20.0  # texture
    return image - torch.tensor(config.pixel_mean).view(1, 3, 1, 1)


@torch.no_grad()
def random_published_weights(config: DetectorConfig | None = None, seed: int = 0, class_std: float = 0.08,
                             residual_scale: float = 0.3) -> dict[str, np.ndarray]:
    """A state dict with detectron2 names and the published shapes: name → float32 array.

    ``class_std`` sets how peaked the class scores are; ``residual_scale`` the
    damping of each residual branch (the gain of its last batch norm).
    """
    from extract.torchvision_backend import build_modules, torchvision_name

    config = config or DetectorConfig()
    generator = torch.Generator().manual_seed(seed)
    model = build_modules(config)

    def normal(tensor: torch.Tensor, std: float) -> None:
        tensor.copy_(torch.randn(tensor.shape, generator=generator) * std)

    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1] // module.groups
            normal(module.weight, (2.0 / fan_in) ** 0.5)
            if module.bias is not None:
                module.bias.zero_()
    head = model.rpn.head
    for conv, std in ((head.conv, 0.01), (head.objectness_logits, 0.05), (head.anchor_deltas, 0.002)):
        normal(conv.weight, std)
        normal(conv.bias, std)
    predictor = model.box_predictor
    for layer, std in ((predictor.cls_score, class_std), (predictor.bbox_pred, 0.001),
                       (predictor.fc_attr, (2.0 / predictor.fc_attr.in_features) ** 0.5),
                       (predictor.attr_score, 0.05)):
        normal(layer.weight, std)
        normal(layer.bias, std)
    normal(predictor.cls_embedding.weight, 0.5)

    damped = {id(m.bn3) for m in model.modules() if hasattr(m, "bn3")}

    def calibrate(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0]
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3)) + 1e-3)
        module.weight.fill_(residual_scale if id(module) in damped else 1.0)
        normal(module.bias, 0.05)

    hooks = [m.register_forward_pre_hook(calibrate) for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    model.rpn.post_nms_topk = 32  # enough RoIs for res5's statistics; a full 300 would take half a minute
    try:
        model.eval()(_calibration_image(config, generator), [(256, 320)])
    finally:
        for hook in hooks:
            hook.remove()
    tensors = model.state_dict()
    return {name: tensors[torchvision_name(name)].numpy().astype(np.float32).copy()
            for name in expected_shapes(config)}
