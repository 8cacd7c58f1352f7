"""The extract stage of `tshsr-pipe run` and of the demo: raw images → feature shards.

The stage's options are those of `tshsr-pipe extract`, by the same names with underscores:
``weights`` (required) and ``list``, and the run options of `extract.config.RUN_OPTIONS`
(``boxes``, ``num_boxes``, ``rois``, ``min_size``, ``workers``, …); the output directory is
the pipeline's ``features``. Extraction is incremental by itself: images already in complete
shards are skipped, so a stage with nothing left to do writes nothing and leaves the later
stages up to date.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipelines.errors import PipelineError, StageStopped

STAGE_OPTIONS = ("weights", "list")  # the command's --weights and --list; the others are RUN_OPTIONS
DEMO_WEIGHTS = "weights/random_bottom_up_attr_shortcuts.pkl"
# The demo's scenes are 192-pixel renders: keep them at that size, and take fewer RoIs than the
# original's 300 (res5 over the RoIs is most of the time on a CPU).
DEMO_EXTRACT = {"min_size": 192, "max_size": 192, "rois": 24, "num_boxes": 12, "workers": 1}


def extract_config(options: dict[str, Any], device: str) -> tuple[Path, Path | None, Any]:
    """(weights, image list or None, ExtractConfig) from a pipeline's extract section, checked without running.

    PipelineError for an unknown option (listing the known ones) or missing weights;
    ExtractError for a value of the wrong type or range. ``device`` applies unless the
    section sets its own.
    """
    from extract.config import RUN_OPTIONS, ExtractConfig

    options = dict(options)
    unknown = sorted(set(options) - set(STAGE_OPTIONS) - set(RUN_OPTIONS))
    if unknown:
        hint = " (the output directory is the pipeline's 'features')" if "out" in unknown else ""
        raise PipelineError(f"unknown extract option(s): {', '.join(unknown)}{hint}; known (those of "
                            f"`tshsr-pipe extract`): {', '.join((*STAGE_OPTIONS, *RUN_OPTIONS))}")
    weights, image_list = options.pop("weights", None), options.pop("list", None)
    if not weights:
        from extract.weights import WEIGHTS_SOURCE

        raise PipelineError(f"the extract stage needs 'weights': {WEIGHTS_SOURCE}")
    options.setdefault("device", device)
    return Path(weights), Path(image_list) if image_list else None, ExtractConfig.from_options(options)


def extract_stage(images: Path, features: Path, options: dict[str, Any], *, device: str,
                  log: Callable[[str], None], progress: bool = True, force: bool = False) -> None:
    """Run (or resume) the extraction; `force` also retries the images a previous run failed on."""
    from extract.run import extract_features

    weights, image_list, config = extract_config(options, device)
    if force:
        config = dataclasses.replace(config, retry_failed=True)
    summary = extract_features(images, features, weights, config, image_list=image_list, progress=progress)
    if summary.interrupted:
        message = f"extraction interrupted; run the pipeline again to continue ({features})"
        if summary.signum is not None:
            raise StageStopped(message, summary.signum)
        raise PipelineError(message)
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
        save_weights_pkl(random_published_weights(DetectorConfig(), seed=0, residual_scale=0.0), path)
    return {"weights": str(path), **DEMO_EXTRACT}
