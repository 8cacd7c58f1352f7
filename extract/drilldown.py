"""Import DrillDown's per-image region features (``region_36_final``) into feature shards.

DrillDown (and HMRN, which reads DrillDown's files) keeps the bottom-up-attention
features of every Visual Genome image as one pickle per image,
``region_36_final/<image id, 12 digits>.npy`` (a pickle despite the suffix), written
by DrillDown's ``tools/save_region_features.py`` from the BUTD TSV::

    {"region_feats": (k, 2048) float32, "region_boxes": (k, 4) float32 x1 y1 x2 y2 pixels,
     "region_clses": (k,) int32}

The features and boxes go to the shards; the image size is not in the file
(recorded as 0 × 0, as for SCAN's precomputed features) and ``region_clses`` is
left out (its class numbering is not documented, so it is not presented as our
``object_ids``). The image id is the file stem without its leading zeros
(``000000002345.npy`` → ``2345``), the id the Visual Genome query files use.

A pickle can run code when loaded; these files are read with
`extract.safepickle.restricted_load`, which admits numpy arrays and plain
containers only and refuses anything else before it is called.

The import is resumable (the importers' one loop, `extract.shards.import_shards`):
images already in the output's shards are skipped, what a killed run left is
tidied, and shards are committed every `shard_size` images.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from extract.config import ExtractError
from extract.safepickle import restricted_load
from extract.shards import RegionRecord, import_shards

SUFFIXES = (".npy", ".pkl")
FEATURES_KEY, BOXES_KEY = "region_feats", "region_boxes"


class DrillDownError(ExtractError):
    """A DrillDown feature file is unsafe or not in DrillDown's layout; the message names the file."""


@dataclass
class DrillDownImport:
    """What `import_drilldown_features` did."""

    written: int  # images written by this call
    skipped: int  # images already in the output (a resumed import)
    feature_dim: int
    max_boxes: int


def image_id_of(path: Path) -> str:
    """``000000002345.npy`` → ``2345``; a non-numeric stem is kept as it is."""
    stem = path.stem
    return str(int(stem)) if stem.isdigit() else stem


def read_region_file(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """One DrillDown pickle → (features (k, D) float32, boxes (k, 4) float32); DrillDownError naming the file."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            if handle.read(6) == b"\x93NUMPY":
                raise DrillDownError(f"{path}: a plain .npy array, not DrillDown's pickle of region_feats and "
                                     "region_boxes")
            handle.seek(0)
            payload: Any = restricted_load(handle)
    except pickle.UnpicklingError as error:
        if not str(error).startswith("refused"):  # a truncated or corrupt file, not a refusal
            raise DrillDownError(f"{path}: not a readable DrillDown feature pickle ({error})") from None
        raise DrillDownError(f"{path}: refused: the pickle needs more than numpy arrays and plain data ({error}); "
                             "DrillDown's feature files never do, so it may be tampered with") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError,
            UnicodeDecodeError) as error:
        raise DrillDownError(f"{path}: not a readable DrillDown feature pickle ({type(error).__name__}: "
                             f"{error})") from None
    if not isinstance(payload, dict) or FEATURES_KEY not in payload or BOXES_KEY not in payload:
        keys = sorted(map(str, payload)) if isinstance(payload, dict) else type(payload).__name__
        raise DrillDownError(f"{path}: expected a dict with {FEATURES_KEY!r} and {BOXES_KEY!r}, found {keys}")
    features, boxes = payload[FEATURES_KEY], payload[BOXES_KEY]
    if not isinstance(features, np.ndarray) or features.ndim != 2 or features.dtype.kind != "f":
        raise DrillDownError(f"{path}: {FEATURES_KEY} must be a (regions, dim) float array")
    if not isinstance(boxes, np.ndarray) or boxes.shape != (len(features), 4):
        shape = getattr(boxes, "shape", type(boxes).__name__)
        raise DrillDownError(f"{path}: {BOXES_KEY} has shape {shape}, expected ({len(features)}, 4)")
    if len(features) == 0:
        raise DrillDownError(f"{path}: no regions")
    if not np.isfinite(features).all():
        raise DrillDownError(f"{path}: {FEATURES_KEY} holds NaN or infinity")
    return features.astype(np.float32), boxes.astype(np.float32)


def region_files(directory: str | os.PathLike) -> list[Path]:
    """The feature files of a ``region_36_final`` directory, sorted by name."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DrillDownError(f"{directory}: no such directory (DrillDown's region_36_final)")
    files = sorted(p for p in directory.iterdir() if p.suffix in SUFFIXES and p.is_file())
    if not files:
        raise DrillDownError(f"{directory}: no {' or '.join(SUFFIXES)} feature files")
    return files


def import_drilldown_features(
    directory: str | os.PathLike,
    out: str | os.PathLike,
    *,
    image_ids: Iterable[str] | None = None,
    max_boxes: int = 36,
    shard_size: int = 1000,
    dtype: str = "float16",
    on_images: Callable[[int], None] | None = None,
) -> DrillDownImport:
    """Convert DrillDown's ``region_36_final`` pickles into shards in `out`.

    Args:
        directory: the ``region_36_final`` directory.
        out: the feature directory to write (or to complete, on a rerun).
        image_ids: import only these images (e.g. those of a query file); default all.
        max_boxes: K of the shards; a file with more regions is an error.
        shard_size: images per shard (a kill loses at most one shard's work).
        on_images: called with the number of images of each shard committed (progress).
    """
    files = region_files(directory)
    if image_ids is not None:
        wanted = set(image_ids)
        files = [p for p in files if image_id_of(p) in wanted]
    owners: dict[str, Path] = {}
    for path in files:
        other = owners.setdefault(image_id_of(path), path)
        if other != path:
            raise DrillDownError(f"{path}: image {image_id_of(path)} also has the file {other.name}")
    settings = {"source": "drilldown-region_36_final", "directory": str(directory), "dtype": dtype}

    def read(path: Path) -> RegionRecord:
        features, boxes = read_region_file(path)
        return RegionRecord(image_id_of(path), features, boxes, (0, 0))

    def check(record: RegionRecord, boxes: int, dim: int) -> None:
        path = owners[record.image_id]
        if record.features.shape[1] != dim:
            raise DrillDownError(f"{path}: features of width {record.features.shape[1]}, the others have {dim}")
        if len(record.features) > boxes:
            raise DrillDownError(f"{path}: {len(record.features)} regions, more than max_boxes = {boxes}")

    done = import_shards(out, ((image_id_of(path), lambda path=path: read(path)) for path in files),
                         max_boxes=max_boxes, dtype=dtype, settings=settings, shard_size=shard_size, check=check,
                         extractor={"model": "drilldown-region_36_final", "source": str(directory)},
                         on_images=on_images)
    return DrillDownImport(written=done.written, skipped=done.skipped, feature_dim=done.feature_dim,
                           max_boxes=done.max_boxes)
