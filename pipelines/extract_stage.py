"""The extract stage of `tshsr-pipe run` and of the demo: raw images → feature shards.

The stage's options are those of `tshsr-pipe extract`: ``weights`` (required), any field of
`extract.config.ExtractConfig` (``box_mode``, ``num_boxes``, ``workers``, …) and any field of
`extract.config.DetectorConfig` (``min_size``, ``max_size``, ``rpn_post_nms_topk``, …).
Extraction is incremental by itself: images already in complete shards are skipped, so a
stage with nothing left to do writes nothing and leaves the later stages up to date.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipelines.errors import PipelineError

DEMO_WEIGHTS = "weights/random_bottom_up_attr_shortcuts.pkl"
# The demo's scenes are 192-pixel renders: keep them at that size, and take fewer RoIs than the
# original's 300 (res5 over the RoIs is most of the time on a CPU).
DEMO_EXTRACT = {"min_size": 192, "max_size": 192, "rpn_post_nms_topk": 24, "num_boxes": 12, "workers": 1}


def extract_config(options: dict[str, Any], device: str) -> tuple[Path, Any]:
    """(weights path, ExtractConfig) from a pipeline's extract options; PipelineError on unknown ones."""
    from extract.config import DetectorConfig, ExtractConfig

    options = dict(options)
    weights = options.pop("weights", None)
    device = options.pop("device", device)
    if not weights:
        from extract.weights import WEIGHTS_SOURCE

        raise PipelineError(f"the extract stage needs 'weights': {WEIGHTS_SOURCE}")
    detector_fields = {f.name for f in dataclasses.fields(DetectorConfig)}
    extract_fields = {f.name for f in dataclasses.fields(ExtractConfig)} - {"detector"}
    unknown = set(options) - detector_fields - extract_fields
    if unknown:
        raise PipelineError(f"unknown extract option(s): {', '.join(sorted(unknown))}")
    detector = dataclasses.replace(DetectorConfig(), **{k: v for k, v in options.items() if k in detector_fields})
    config = ExtractConfig(detector=detector, device=device,
                           **{k: v for k, v in options.items() if k in extract_fields})
    return Path(weights), config


def extract_stage(images: Path, features: Path, options: dict[str, Any], *, device: str,
                  log: Callable[[str], None], progress: bool = True, force: bool = False) -> None:
    """Run (or resume) the extraction; `force` also retries the images a previous run failed on."""
    from extract.run import extract_features

    weights, config = extract_config(options, device)
    if force:
        config = dataclasses.replace(config, retry_failed=True)
    summary = extract_features(images, features, weights, config, progress=progress)
    if summary.interrupted:
        raise PipelineError(f"extraction interrupted; run the pipeline again to continue ({features})")
    if summary.done == 0:
        log(f"extract: up to date ({features}: {summary.skipped} images done before)")
    else:
        log(f"extract: {summary.done} images extracted, {summary.skipped} done before, "
            f"{len(summary.failed)} failed → {features}")


def demo_extract_options(out: Path) -> dict[str, Any]:
    """Extraction options for the demo, with random weights in the published layout written once.

    No weights can be downloaded here, so the detector runs with random weights (`extract.testing`)
    whose residual branches are switched off: each ResNet stage is then its random projection
    shortcut, which keeps the colours and shapes in the region features. Measured on the demo's
    scenes: centred region features have a mean |cos| of 0.36 against 0.80 with the default
    damping, and validation rsum after 3 epochs 289 against 211.
    """
    from extract.config import DetectorConfig
    from extract.testing import random_published_weights
    from extract.weights import save_weights_pkl

    path = out / DEMO_WEIGHTS
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        save_weights_pkl(random_published_weights(DetectorConfig(), seed=0, residual_scale=0.0), tmp)
        tmp.replace(path)
    return {"weights": str(path), **DEMO_EXTRACT}
