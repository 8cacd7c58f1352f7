"""Loading the published bottom-up-attention weights, safely, and checking every name and shape.

The weights are py-bottom-up-attention's ``faster_rcnn_from_caffe_attr.pkl``:
a pickle of ``{"model": {name: numpy array}, ...}`` with detectron2's
parameter names (the Caffe model converted, background class last). A pickle
can run code when loaded, so it is read with `extract.safepickle.RestrictedUnpickler`,
which admits numpy arrays and plain containers and refuses everything else before
anything is called. A ``.pth`` holding the same names (e.g. the state dict
re-saved from detectron2) loads with ``torch.load(weights_only=True)``.

bottom-up-attention.pytorch's ``.pth`` files (Caffe layout: 2-way RPN logits,
background first, ``cls_embed``/``attr_linear1``/``attr_linear2``) are
recognised and refused with an explanation: converting them needs more than
renaming and the conversion has not been verified against that project.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from extract.config import DetectorConfig, ExtractError
from extract.safeio import atomic_write, sha256_file
from extract.safepickle import restricted_load

WEIGHTS_FILE = "faster_rcnn_from_caffe_attr.pkl"
WEIGHTS_URL = "http://nlp.cs.unc.edu/models/faster_rcnn_from_caffe_attr.pkl"
WEIGHTS_SOURCE = (f"{WEIGHTS_FILE}, published by airsplay/py-bottom-up-attention ({WEIGHTS_URL}); "
                  "see extract/README.md")
BLOCKS_PER_STAGE = {50: (3, 4, 6), 101: (3, 4, 23), 152: (3, 8, 36)}  # res2, res3, res4
STAGE_WIDTHS = {2: (64, 256), 3: (128, 512), 4: (256, 1024), 5: (512, 2048)}  # bottleneck, out channels


class WeightsError(ExtractError):
    """The weights file is missing, unsafe or not the bottom-up-attention model; the message names the file."""


# --------------------------------------------------------------------------- the expected layout


def _bottleneck_shapes(prefix: str, in_ch: int, mid: int, out: int, shortcut: bool) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name: str, shape: tuple[int, ...]) -> None:
        shapes[f"{prefix}.{name}.weight"] = shape
        for stat in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{name}.norm.{stat}"] = (shape[0],)

    if shortcut:
        conv("shortcut", (out, in_ch, 1, 1))
    conv("conv1", (mid, in_ch, 1, 1))
    conv("conv2", (mid, mid, 3, 3))
    conv("conv3", (out, mid, 1, 1))
    return shapes


def expected_shapes(config: DetectorConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of the attribute model, detectron2 names → shapes, in the published order."""
    if config.depth not in BLOCKS_PER_STAGE:
        raise ValueError(f"ResNet depth must be one of {sorted(BLOCKS_PER_STAGE)}, not {config.depth}")
    shapes: dict[str, tuple[int, ...]] = {"backbone.stem.conv1.weight": (64, 3, 7, 7)}
    for stat in ("weight", "bias", "running_mean", "running_var"):
        shapes[f"backbone.stem.conv1.norm.{stat}"] = (64,)
    in_ch = 64
    for stage, blocks in zip((2, 3, 4), BLOCKS_PER_STAGE[config.depth], strict=True):
        mid, out = STAGE_WIDTHS[stage]
        for index in range(blocks):
            shapes.update(_bottleneck_shapes(f"backbone.res{stage}.{index}", in_ch, mid, out, index == 0))
            in_ch = out
    anchors, hidden = config.num_anchors, config.rpn_hidden
    rpn = "proposal_generator.rpn_head"
    shapes.update({f"{rpn}.conv.weight": (hidden, in_ch, 3, 3), f"{rpn}.conv.bias": (hidden,),
                   f"{rpn}.objectness_logits.weight": (anchors, hidden, 1, 1),
                   f"{rpn}.objectness_logits.bias": (anchors,),
                   f"{rpn}.anchor_deltas.weight": (4 * anchors, hidden, 1, 1),
                   f"{rpn}.anchor_deltas.bias": (4 * anchors,)})
    mid, out = STAGE_WIDTHS[5]
    for index in range(3):
        shapes.update(_bottleneck_shapes(f"roi_heads.res5.{index}", in_ch, mid, out, index == 0))
        in_ch = out
    classes, attributes, embed, hidden_attr = config.num_classes + 1, config.num_attributes + 1, out // 8, out // 4
    head = "roi_heads.box_predictor"
    shapes.update({f"{head}.cls_score.weight": (classes, out), f"{head}.cls_score.bias": (classes,),
                   f"{head}.bbox_pred.weight": (4 * config.num_classes, out),
                   f"{head}.bbox_pred.bias": (4 * config.num_classes,),
                   f"{head}.cls_embedding.weight": (classes, embed),
                   f"{head}.fc_attr.weight": (hidden_attr, out + embed), f"{head}.fc_attr.bias": (hidden_attr,),
                   f"{head}.attr_score.weight": (attributes, hidden_attr), f"{head}.attr_score.bias": (attributes,)})
    return shapes


# --------------------------------------------------------------------------- loading and checking


@dataclass
class LoadedWeights:
    """A checked state dict (detectron2 names → float32 arrays) and where it came from."""

    state: dict[str, np.ndarray]
    path: Path
    sha256: str


_MILVLG_MARKERS = ("cls_embed.weight", "attr_linear1.weight", "attr_linear2.weight")


def _unwrap(payload: Any, path: Path) -> Mapping[str, Any]:
    if isinstance(payload, Mapping) and isinstance(payload.get("model"), Mapping):
        payload = payload["model"]
    elif isinstance(payload, Mapping) and isinstance(payload.get("state_dict"), Mapping):
        payload = payload["state_dict"]
    if not isinstance(payload, Mapping) or not all(isinstance(k, str) for k in payload):
        raise WeightsError(f"{path}: not a weights file (expected a dict of arrays under 'model')")
    return payload


def _read_payload(path: Path) -> Mapping[str, Any]:
    with open(path, "rb") as handle:
        head = handle.read(4)
        handle.seek(0)
        if head.startswith(b"PK"):  # torch.save's zip format
            import torch

            try:
                payload = torch.load(handle, map_location="cpu", weights_only=True)
            except Exception as error:  # noqa: BLE001 - any refusal or corruption is the file's problem
                first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                raise WeightsError(f"{path}: refused or unreadable torch file ({first})") from None
            state = _unwrap(payload, path)
            return {k: v.detach().cpu().numpy() if hasattr(v, "detach") else v for k, v in state.items()}
        try:
            payload = restricted_load(handle)
        except pickle.UnpicklingError as error:
            raise WeightsError(f"{path}: refused: the pickle needs more than numpy arrays and plain data "
                               f"({error}); a weights file never does, so it may be tampered with") from None
        except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError,
                UnicodeDecodeError) as error:
            raise WeightsError(f"{path}: not a readable weights pickle ({type(error).__name__}: {error})") from None
    return _unwrap(payload, path)


def check_state(state: Mapping[str, Any], config: DetectorConfig, path: Path) -> dict[str, np.ndarray]:
    """Every expected name present with its shape and a finite float dtype; returns float32 arrays.

    Raises WeightsError listing missing, unexpected and mis-shaped entries.
    """
    if any(name.endswith(marker) for name in state for marker in _MILVLG_MARKERS):
        raise WeightsError(
            f"{path}: this is bottom-up-attention.pytorch's Caffe layout (cls_embed/attr_linear1, 2-way RPN "
            "logits, background first), which needs a conversion tshsr-pipe does not do; use " + WEIGHTS_SOURCE)
    expected = expected_shapes(config)
    missing = [name for name in expected if name not in state]
    unexpected = sorted(name for name in state if name not in expected)
    wrong = []
    arrays: dict[str, np.ndarray] = {}
    for name, shape in expected.items():
        if name not in state:
            continue
        value = state[name]
        if not isinstance(value, np.ndarray):
            wrong.append(f"{name} is a {type(value).__name__}, not an array")
        elif value.dtype.kind != "f":
            wrong.append(f"{name} has dtype {value.dtype}, expected floats")
        elif tuple(value.shape) != shape:
            wrong.append(f"{name} {list(value.shape)} (expected {list(shape)})")
        else:
            arrays[name] = np.ascontiguousarray(value, dtype=np.float32)
    problems = []
    if missing:
        hint = (" (the model without attributes? use the _attr weights)"
                if all("box_predictor" in name for name in missing) else "")
        problems.append(f"{len(missing)} missing: {_short(missing)}{hint}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_short(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} wrong: {_short(wrong)}")
    if problems:
        raise WeightsError(f"{path}: not the bottom-up-attention attribute model (ResNet-{config.depth}, "
                           f"{config.num_classes} classes, {config.num_attributes} attributes): "
                           + "; ".join(problems) + f"; expected {WEIGHTS_SOURCE}")
    bad = [name for name, value in arrays.items() if not np.isfinite(value).all()]
    if bad:
        raise WeightsError(f"{path}: {len(bad)} arrays hold NaN or infinity: {_short(bad)}")
    return arrays


def _short(items: list[str], limit: int = 4) -> str:
    return ", ".join(items[:limit]) + (f", … ({len(items) - limit} more)" if len(items) > limit else "")


def load_weights(path: str | Path, config: DetectorConfig) -> LoadedWeights:
    """Read and check a weights file (.pkl or .pth); WeightsError with a one-line reason otherwise."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"{path}: no such weights file; the extractor needs {WEIGHTS_SOURCE}")
    if path.is_dir():
        raise WeightsError(f"{path}: is a directory; give the weights file itself ({WEIGHTS_FILE})")
    if path.stat().st_size == 0:
        raise WeightsError(f"{path}: empty file; download {WEIGHTS_SOURCE} again")
    state = check_state(_read_payload(path), config, path)
    return LoadedWeights(state=state, path=path, sha256=sha256_file(path))


def save_weights_pkl(state: Mapping[str, np.ndarray], path: str | Path, protocol: int = 4) -> Path:
    """Write a state dict as the published layout, ``{"model": {name: array}, "__author__": ...}``, atomically."""
    path = Path(path)
    payload = {"model": {name: np.asarray(value) for name, value in state.items()}, "__author__": "tshsr-pipe"}
    with atomic_write(path) as handle:
        pickle.dump(payload, handle, protocol=protocol)
    return path
