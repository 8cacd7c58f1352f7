"""Settings of the detector and of an extraction run, as typed dataclasses.

`DetectorConfig` fixes the network and its test-time behaviour (the values of
py-bottom-up-attention's ``faster_rcnn_R_101_C4_attr_caffemaxpool.yaml`` with
the original Caffe tool's 600/1000 resizing and 300 RoIs). `ExtractConfig`
holds what a user chooses for a run. Both are saved as plain data in the
manifest; `output_settings` is the part that must not change between a run
and its resumption, because it changes the features written.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

BOX_MODES = ("fixed", "adaptive")
BACKENDS = ("auto", "torchvision", "detectron2")


class ExtractError(ValueError):
    """A run that cannot start because of its input (weights, images, output directory, options).

    The message is one line naming the file and the problem; the CLI prints it
    without a traceback.
    """


@dataclass(frozen=True)
class DetectorConfig:
    """The bottom-up-attention Faster R-CNN (ResNet-101 C4, Visual Genome 1600 objects / 400 attributes)."""

    depth: int = 101  # ResNet depth; the published model is ResNet-101 (3, 4, 23 blocks in res2..res4)
    num_classes: int = 1600  # Visual Genome object classes; the background logit comes last (1601 in all)
    num_attributes: int = 400  # Visual Genome attributes; the "no attribute" logit comes last (401 in all)
    pixel_mean: tuple[float, float, float] = (102.9801, 115.9465, 122.7717)  # Caffe's BGR means, std 1
    min_size: int = 600  # shorter image side after resizing (the original tool's TEST.SCALES)
    max_size: int = 1000  # cap on the longer side after resizing (TEST.MAX_SIZE)
    anchor_sizes: tuple[int, ...] = (64, 128, 256, 512)  # anchor side lengths in input pixels, on res4
    anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)  # anchor height/width ratios
    rpn_hidden: int = 512  # channels of the RPN's 3x3 conv (VG model; detectron2's default is 1024)
    rpn_pre_nms_topk: int = 6000  # proposals kept by objectness before the RPN's NMS
    rpn_post_nms_topk: int = 300  # RoIs per image after the RPN's NMS (the original's 300)
    rpn_nms_threshold: float = 0.7  # IoU threshold of the RPN's NMS
    pooler_resolution: int = 14  # RoI pooling output (14x14) fed to the stride-1 res5
    roi_chunk: int = 1024  # RoIs through res5 at once; bounds memory, does not change results

    @property
    def num_anchors(self) -> int:
        return len(self.anchor_sizes) * len(self.anchor_ratios)


@dataclass
class ExtractConfig:
    """What one `tshsr-pipe extract` run does; `detector` holds the network settings."""

    detector: DetectorConfig = field(default_factory=DetectorConfig)  # network and test-time settings
    box_mode: str = "fixed"  # "fixed": the top `num_boxes` regions; "adaptive": min..max above conf_threshold
    num_boxes: int = 36  # regions per image in fixed mode (the original's 36)
    min_boxes: int = 10  # adaptive mode: at least this many regions
    max_boxes: int = 100  # adaptive mode: at most this many regions
    conf_threshold: float = 0.2  # adaptive mode: keep regions whose best class score reaches this
    nms_threshold: float = 0.3  # IoU threshold of the per-class NMS that ranks regions
    feature_dtype: str = "float16"  # dtype of the stored features: float16 or float32
    backend: str = "auto"  # "detectron2", "torchvision", or "auto" (detectron2 when importable)
    device: str = "cpu"  # torch device: cpu, cuda or cuda:N (torchrun ranks take cuda:LOCAL_RANK)
    half: bool = False  # float16 autocast on GPU (features checked against float32 in the tests)
    batch_size: int = 0  # images per forward; 0 = 1 on CPU, 4 on GPU
    workers: int = 2  # image-decoding processes running alongside the model (0 = decode inline)
    shard_size: int = 1000  # images per shard
    commit_seconds: float = 300.0  # also close a shard after this long, so a kill loses little work
    max_pixels: int = 250_000_000  # larger images are decoded at reduced scale (JPEG) or skipped
    retry_failed: bool = False  # try again the images a previous run listed as failed

    def __post_init__(self) -> None:
        if isinstance(self.detector, dict):  # rebuilt from plain data (a manifest)
            self.detector = DetectorConfig(**{k: tuple(v) if isinstance(v, list) else v
                                              for k, v in self.detector.items()})
        if self.box_mode not in BOX_MODES:
            raise ExtractError(f"box_mode must be one of {BOX_MODES}, not {self.box_mode!r}")
        if self.backend not in BACKENDS:
            raise ExtractError(f"backend must be one of {BACKENDS}, not {self.backend!r}")
        if self.feature_dtype not in ("float16", "float32"):
            raise ExtractError(f"feature_dtype must be float16 or float32, not {self.feature_dtype!r}")
        if not 1 <= self.min_boxes <= self.max_boxes:
            raise ExtractError(f"need 1 <= min_boxes <= max_boxes, got {self.min_boxes}, {self.max_boxes}")
        if self.num_boxes < 1:
            raise ExtractError(f"num_boxes must be at least 1, not {self.num_boxes}")

    @property
    def boxes_per_image(self) -> int:
        """K, the rows of each image in a shard (the most boxes an image can get)."""
        return self.num_boxes if self.box_mode == "fixed" else self.max_boxes

    def output_settings(self) -> dict[str, Any]:
        """The settings that change the features written; a resumed run must use the same."""
        selection = {"box_mode": self.box_mode, "nms_threshold": self.nms_threshold}
        if self.box_mode == "fixed":
            selection["num_boxes"] = self.num_boxes
        else:
            selection.update(min_boxes=self.min_boxes, max_boxes=self.max_boxes,
                             conf_threshold=self.conf_threshold)
        detector = asdict(self.detector)
        del detector["roi_chunk"]  # memory only
        return {"detector": detector, "selection": selection, "feature_dtype": self.feature_dtype}

    def digest(self) -> str:
        """Short sha256 of `output_settings`, stored with every shard."""
        text = json.dumps(self.output_settings(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]
