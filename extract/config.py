"""Settings of the detector and of an extraction run, as typed dataclasses, and the options that set them.

`DetectorConfig` fixes the network and its test-time behaviour (the values of
py-bottom-up-attention's ``faster_rcnn_R_101_C4_attr_caffemaxpool.yaml`` with
the original Caffe tool's 600/1000 resizing and 300 RoIs). `ExtractConfig`
holds what a user chooses for a run. Both are saved as plain data in the
manifest; `output_settings` is the part that must not change between a run
and its resumption, because it changes the features written.

`RUN_OPTIONS` names what a user can set, once: ``tshsr-pipe extract --num-boxes 20``
and ``num_boxes: 20`` in a pipeline file's ``extract:`` section are the same option,
`ExtractConfig.from_options` turns either into a config, and the command's defaults
are read back from the dataclasses (`default_options`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from extract.runtime import DEVICE_CHOICES

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
    device: str = "auto"  # auto (CUDA when present), cpu, cuda or cuda:N (torchrun ranks take cuda:LOCAL_RANK)
    half: bool = False  # float16 autocast on GPU (features checked against float32 in the tests)
    batch_size: int = 0  # images per forward; 0 = 1 on CPU, 4 on GPU
    workers: int = 2  # image-decoding processes running alongside the model (0 = decode inline)
    shard_size: int = 1000  # images per shard
    commit_minutes: float = 5.0  # also close a shard after this long, so a kill loses little work
    max_megapixels: float = 250.0  # larger images are decoded at reduced scale (JPEG) or skipped
    retry_failed: bool = False  # try again the images a previous run listed as failed

    def __post_init__(self) -> None:
        if isinstance(self.detector, dict):  # rebuilt from plain data (a manifest)
            self.detector = DetectorConfig(**{k: tuple(v) if isinstance(v, list) else v
                                              for k, v in self.detector.items()})
        for option in RUN_OPTIONS.values():
            option.to_field(option.from_field(option.read(self)))
        if self.min_boxes > self.max_boxes:
            raise ExtractError(f"need min_boxes <= max_boxes, got {self.min_boxes} > {self.max_boxes}")

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> ExtractConfig:
        """The config of ``tshsr-pipe extract --NAME VALUE …`` from ``{NAME: VALUE}`` (`RUN_OPTIONS` names).

        Options not given keep the dataclass defaults. ExtractError names an unknown option
        (with the list of known ones) or a value of the wrong type or range.
        """
        unknown = sorted(set(options) - set(RUN_OPTIONS))
        if unknown:
            raise ExtractError(f"unknown extract option(s): {', '.join(unknown)}; known: {', '.join(RUN_OPTIONS)}")
        settings: dict[str, Any] = {}
        detector: dict[str, Any] = {}
        for name, value in options.items():
            option = RUN_OPTIONS[name]
            section, _, target = option.field.rpartition(".")
            (detector if section == "detector" else settings)[target] = option.to_field(value)
        return cls(detector=replace(DetectorConfig(), **detector), **settings)

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


# --------------------------------------------------------------------------- the options a user sets


@dataclass(frozen=True)
class RunOption:
    """One setting of an extraction run, by the name the user writes.

    ``tshsr-pipe extract --NAME`` (underscores written as dashes) and ``NAME:`` in a
    pipeline's ``extract:`` section; `field` is where it lands in `ExtractConfig`.
    """

    name: str  # the option's name, underscored
    field: str  # the ExtractConfig field it sets, or "detector.<DetectorConfig field>"
    help: str  # one sentence for --help
    kind: type = int  # int, float, bool or str
    choices: tuple[str, ...] = ()  # the values a str option allows (none: any)
    minimum: float | None = None  # smallest value allowed
    maximum: float | None = None  # largest value allowed
    above_minimum: bool = False  # the minimum itself is not allowed
    flag_values: tuple[Any, Any] | None = None  # a flag setting a non-bool field: (value when off, value when on)

    def read(self, config: ExtractConfig) -> Any:
        """The field's value in `config`."""
        section, _, target = self.field.rpartition(".")
        return getattr(config.detector if section == "detector" else config, target)

    def from_field(self, value: Any) -> Any:
        """The option's value for a field value (a flag: whether the field has its "on" value)."""
        if self.flag_values is None:
            return value
        if value not in self.flag_values:
            raise ExtractError(f"{self.field} must be one of {', '.join(map(str, self.flag_values))}, not {value!r}")
        return value == self.flag_values[1]

    def to_field(self, value: Any) -> Any:
        """Check an option value's type and range and convert it to the field's value; ExtractError if wrong."""
        label = self.name if self.name == self.field else f"{self.name} ({self.field})"
        if self.kind is bool:
            ok = isinstance(value, bool)
        elif self.kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif self.kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            ok = isinstance(value, str)
        if not ok:
            expected = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}[self.kind]
            raise ExtractError(f"{label} must be {expected}, not {value!r}")
        if self.choices and value not in self.choices:
            raise ExtractError(f"{label} must be one of {', '.join(self.choices)}, not {value!r}")
        low_fails = self.minimum is not None and (value <= self.minimum if self.above_minimum else value < self.minimum)
        if low_fails or (self.maximum is not None and value > self.maximum):
            bounds = (f"above {self.minimum}" if self.above_minimum else f"at least {self.minimum}") \
                if self.maximum is None else f"between {self.minimum} and {self.maximum}"
            raise ExtractError(f"{label} must be {bounds}, not {value!r}")
        if self.flag_values is not None:
            return self.flag_values[1] if value else self.flag_values[0]
        return float(value) if self.kind is float else value


RUN_OPTIONS: dict[str, RunOption] = {option.name: option for option in (
    RunOption("boxes", "box_mode", "fixed: the top --num-boxes regions; adaptive: the regions scoring at least "
              "--conf-threshold, between --min-boxes and --max-boxes (the original 10-100).", str, BOX_MODES),
    RunOption("num_boxes", "num_boxes", "Regions per image in fixed mode.", minimum=1),
    RunOption("min_boxes", "min_boxes", "Adaptive mode: at least this many regions per image.", minimum=1),
    RunOption("max_boxes", "max_boxes", "Adaptive mode: at most this many regions per image.", minimum=1),
    RunOption("conf_threshold", "conf_threshold", "Adaptive mode: keep the regions whose best class score "
              "reaches this.", float, minimum=0, maximum=1),
    RunOption("nms", "nms_threshold", "IoU threshold of the per-class NMS that ranks regions.", float,
              minimum=0, maximum=1),
    RunOption("float32", "feature_dtype", "Store float32 features (else float16).", bool,
              flag_values=("float16", "float32")),
    RunOption("backend", "backend", "auto: detectron2 when it is installed, else torchvision (same results).",
              str, BACKENDS),
    RunOption("device", "device", f"{DEVICE_CHOICES}; auto takes a GPU when there is one, and under torchrun each "
              "rank takes cuda:LOCAL_RANK.", str),
    RunOption("half", "half", "float16 autocast on GPU (checked against float32 by the tests).", bool),
    RunOption("batch_size", "batch_size", "Images per forward pass; 0: 1 on CPU, 4 on GPU.", minimum=0),
    RunOption("workers", "workers", "Image-decoding processes running alongside the detector (0: decode in the "
              "main process).", minimum=0),
    RunOption("shard_size", "shard_size", "Images per shard.", minimum=1),
    RunOption("commit_minutes", "commit_minutes", "Also close a shard after this long, so an interruption "
              "loses at most this much work.", float, minimum=0, above_minimum=True),
    RunOption("min_size", "detector.min_size", "Shorter image side after resizing.", minimum=16),
    RunOption("max_size", "detector.max_size", "Longer image side is capped at this.", minimum=16),
    RunOption("rois", "detector.rpn_post_nms_topk", "RoIs per image after the RPN; res5 over them is most of "
              "the time.", minimum=1),
    RunOption("max_megapixels", "max_megapixels", "Larger JPEGs are decoded at reduced scale, other larger "
              "images are skipped.", float, minimum=0, above_minimum=True),
    RunOption("retry_failed", "retry_failed", "Try again the images a previous run listed as failed.", bool),
)}


def default_options() -> dict[str, Any]:
    """Every option's default, read from the dataclasses' defaults (what `tshsr-pipe extract --help` shows)."""
    defaults = ExtractConfig()
    return {name: option.from_field(option.read(defaults)) for name, option in RUN_OPTIONS.items()}
