"""`tshsr-pipe demo`: the whole chain on a synthetic, learnable world of coloured shapes, in minutes.

Two paths through the same pipeline (`pipelines.run`):

- ``pixels`` (the default): scenes are rendered to PNG files and go through the
  real region-feature extractor (random weights in the published layout, since
  no weights can be downloaded here), then vocab → train → evaluate;
- ``features`` (``--fast``): region features are made directly from the scenes,
  skipping the detector; the rest of the chain is the same.

The metrics are printed beside the chance level of the same test set.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.run import PipelineSpec, run_pipeline
from pipelines.synthetic import make_scenes, write_feature_dataset, write_image_dataset

# A small model and the recipe that learns this world quickly: the hinge summed over all negatives
# throughout (with features from a random detector, switching to the hardest negatives collapses),
# lr 3e-3, then 3e-4 for the last three epochs.
DEMO_MODEL = {"embed_size": 128, "sim_dim": 64, "word_dim": 64, "reasoning_steps": 2}
DEMO_TRAIN = {"epochs": 10, "batch_size": 32, "learning_rate": 3e-3, "warmup_epochs": 10, "lr_decay_epoch": 7,
              "lr_decay": 0.1, "workers": 0, "val_images": 0, "checkpoint_every": 0, "seed": 0}


def demo_spec(out: Path, *, pixels: bool, images: int, seed: int, device: str) -> PipelineSpec:
    """Write the demo's data into `out` and describe the pipeline that uses it."""
    scenes = make_scenes(images, seed=seed)
    if pixels:
        from pipelines.extract_stage import demo_extract_options

        image_dir = write_image_dataset(out, scenes, seed=seed)
        return PipelineSpec(workdir=out, captions=out / "captions.jsonl", features=out / "features",
                            images=image_dir, name="demo", device=device,
                            extract=demo_extract_options(out), vocab={"threshold": 1}, model=dict(DEMO_MODEL),
                            train=dict(DEMO_TRAIN), evaluate={"split": "test", "protocol": "full"})
    features = out / "features"
    if not (features / "manifest.json").exists():
        write_feature_dataset(features, scenes, seed=seed)
    return PipelineSpec(workdir=out, captions=features / "captions.jsonl", features=features, name="demo",
                        device=device, vocab={"threshold": 1}, model=dict(DEMO_MODEL), train=dict(DEMO_TRAIN),
                        evaluate={"split": "test", "protocol": "full"})


@dataclass
class DemoOutcome:
    """What a demo reached: its metrics beside chance, where its data and model are, and a search to try."""

    results: dict[str, Any]  # the task's metrics on the test scenes
    table: str  # the metrics beside chance level, as the command prints them
    test_images: int
    description: str  # one line on the test set
    features: Path
    checkpoint: Path
    example: str  # a search command to try


def _matching_demo(out: Path, *, fast: bool, images: int | None, seed: int, device: str,
                   log: Callable[[str], None], progress: bool) -> DemoOutcome:
    """Captions ↔ images: the shapes world through the pipeline (rendered and extracted, or --fast)."""
    from matching.retrieval.metrics import chance_metrics

    images = images or 300
    spec = demo_spec(out, pixels=not fast, images=images, seed=seed, device=device)
    results = run_pipeline(spec, log=log, progress=progress)
    n_test = sum(1 for s in make_scenes(images, seed=seed) if s.split == "test")
    checkpoint = spec.run_dir / "model_best.pt"
    how = "features made directly" if fast else "rendered images through the extractor"
    return DemoOutcome(results, format_against_chance(results, chance_metrics(n_test)), n_test,
                       f"{n_test} images × 5 captions ({how})", spec.features, checkpoint,
                       f'tshsr-pipe search --checkpoint {checkpoint} --features {spec.features} "a red circle"')


def format_against_chance(results: dict[str, dict[str, float]], chance: dict[str, float]) -> str:
    keys = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")
    metrics = next(iter(results.values()))
    header = f"{'':<8}" + "".join(f"{k:>9}" for k in keys)
    lines = [header, f"{'model':<8}" + "".join(f"{metrics[k]:9.1f}" for k in keys),
             f"{'chance':<8}" + "".join(f"{chance[k]:9.1f}" for k in keys)]
    return "\n".join(lines)


# The multi-query world: 16 kinds of object (4 colours × 4 shapes), 4 per scene; any one query ("a red
# circle") fits about a quarter of the scenes, the four together one. A small HMRN at lr 5e-3 learns it
# in a few epochs on a CPU.
MULTIQUERY_MODEL = {"word_dim": 16, "embed_size": 32, "sim_dim": 16, "max_turns": 4}
MULTIQUERY_TRAIN = {"batch_size": 32, "learning_rate": 5e-3, "epochs": 8, "lr_decay_epoch": 0, "workers": 0,
                    "features_in_memory": True, "checkpoint_every": 0, "val_images": 0, "seed": 0}


def _multiquery_demo(out: Path, *, fast: bool, images: int | None, seed: int, device: str,
                     log: Callable[[str], None], progress: bool) -> DemoOutcome:
    """Generated multi-query scenes → vocabulary → HMRN → per-round evaluation on the test scenes; a second
    run reuses the data, the vocabulary and a finished model (its features are always made directly)."""
    from matching.config import Config
    from matching.data.vocabulary import build_vocabulary
    from matching.retrieval.evaluate import evaluate_checkpoint
    from matching.retrieval.metrics import format_round_table, round_chance
    from matching.training.loop import train
    from matching.training.rundir import RunDirectory, run_finished
    from pipelines.synthetic import make_multiquery_scenes, write_multiquery_dataset

    images = images or 400
    features = out / "features"
    scenes = make_multiquery_scenes(images, objects_per_scene=MULTIQUERY_MODEL["max_turns"], seed=seed)
    if not (features / "manifest.json").exists():
        write_multiquery_dataset(features, scenes, seed=seed)
        log(f"data: {images} scenes of {MULTIQUERY_MODEL['max_turns']} objects → {features}")
    queries, vocab = features / "queries.jsonl", out / "vocab.json"
    if not vocab.exists():
        built, counted = build_vocabulary(queries, vocab, threshold=1)
        log(f"vocab: {len(built)} words from {counted} training queries")
    run = RunDirectory(out / "runs" / "demo")
    if run_finished(run.path):
        log(f"train: up to date ({run.best})")
    else:
        config = Config.default("multi-query").updated(model=MULTIQUERY_MODEL, train={**MULTIQUERY_TRAIN, "seed": seed})
        train(config, features=features, captions=queries, vocab_path=vocab, run_dir=run.path,
              resume=run.last.exists(), overwrite=not run.last.exists(), device=device, progress=progress, log=log)
    outcome = evaluate_checkpoint(run.best, features, queries, device=device)
    n_test = len(outcome.image_ids)
    return DemoOutcome(outcome.results, format_round_table(outcome.results, round_chance(n_test)), n_test,
                       f"{n_test} scenes, one query per object, rounds 1…{MULTIQUERY_MODEL['max_turns']}", features,
                       run.best, f"tshsr-pipe search --checkpoint {run.best} --features {features} "
                       '"a red circle" "a blue star"')


# The demo of each task that has one: `tshsr-pipe demo --task NAME`.
DEMOS: dict[str, Callable[..., DemoOutcome]] = {"matching": _matching_demo, "multi-query": _multiquery_demo}


def run_demo(out: str | os.PathLike, *, task: str = "matching", fast: bool = False, images: int | None = None,
             seed: int = 0, device: str = "auto", log: Callable[[str], None] = print,
             progress: bool = True) -> DemoOutcome:
    """Generate a task's demo world into `out`, train and evaluate on it; a second run reuses what is done.

    `fast`: make the region features directly instead of rendering images and running the detector.
    `images`: scenes generated (80% train, 10% val, 10% test; default: the task's demo size).
    """
    if task not in DEMOS:
        raise ValueError(f"no demo for task {task!r}; demos: {', '.join(DEMOS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return DEMOS[task](out, fast=fast, images=images, seed=seed, device=device, log=log, progress=progress)
