"""Evaluating checkpoints on a feature directory: one function for every task (`evaluate_checkpoint`).

What is scored, how, and which metrics come out is the task's (`matching.tasks.base.Task`):
a matching model scores every image against every caption (or, with a shortlist, the first
stage's candidates) and reports recall under the standard protocols; a multi-query model
scores every image against every query set after each round. This module loads and checks the
inputs, ensembles models and saved score arrays, shares the images among torchrun's ranks, and
writes the results (docs/formats.md, "Metrics files").
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from extract.safeio import atomic_write, write_json
from extract.shards import FeatureStore
from matching import checkpoint
from matching.config import EvaluationSettings
from matching.data.text import Vocabulary, VocabularyError
from matching.retrieval.metrics import MetricsError
from matching.retrieval.search import check_features
from matching.tasks import get_task, task_of_data


@dataclass
class EvaluationResult:
    """An evaluation of one checkpoint or an ensemble, of any task."""

    results: dict[str, Any]  # the task's metrics: {protocol name: metrics}, {"rounds": [...]}
    sims: np.ndarray | None  # the (ensemble's) score array; None after two-stage retrieval
    image_ids: list[str]
    num_captions: int  # what was ranked against the images: captions, query sets (the task's `unit`)
    split: str | None
    sources: list[str]  # the checkpoints and score files averaged
    task: str = "matching"
    shortlist: dict[str, Any] | None = None  # two-stage retrieval: {protocol: ShortlistReport}

    @property
    def unit(self) -> str:
        """What was ranked against the images ("captions", "query sets")."""
        return get_task(self.task).unit

    def to_json(self, **context: Any) -> dict[str, Any]:
        """The metrics file's content (`write_metrics`), with `context` (paths, …) first."""
        return {**context, "task": self.task, "split": self.split, "sources": self.sources,
                "num_images": len(self.image_ids), f"num_{self.unit.replace(' ', '_')}": self.num_captions,
                "results": self.results}

    def table(self) -> str:
        """The metrics as the command prints them."""
        return get_task(self.task).table(self.results, self.shortlist, len(self.image_ids))


def write_metrics(path: str | os.PathLike, result: EvaluationResult, **context: Any) -> Path:
    """Write an evaluation's metrics as JSON, atomically (the evaluate command and the pipeline's stage)."""
    return write_json(path, result.to_json(**context))


def write_sims(path: str | os.PathLike, sims: np.ndarray) -> Path:
    """Save a score array as .npy, atomically (a full disk leaves no 0-byte file)."""
    with atomic_write(path) as handle:
        np.save(handle, sims)
    return Path(path)


def check_vocab(vocab: Vocabulary, vocab_path: str | os.PathLike) -> None:
    """A vocabulary file given beside a checkpoint must be the checkpoint's own."""
    given = Vocabulary.load(vocab_path)
    if given != vocab:
        differ = next((i for i, (a, b) in enumerate(zip(given.words, vocab.words, strict=False)) if a != b),
                      min(len(given), len(vocab)))
        raise VocabularyError(f"{vocab_path}: does not match the checkpoint's vocabulary "
                              f"({len(given)} vs {len(vocab)} words, first difference at index {differ})")


def load_sims(path: str | os.PathLike, shape: tuple[int, ...]) -> np.ndarray:
    """A saved score array (`--save-sims`) for the same images and texts; MetricsError otherwise."""
    try:
        sims = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise MetricsError(f"{path}: not a readable .npy score matrix ({str(error).splitlines()[0][:200]})") from None
    if sims.shape != shape:
        what = "(rounds × query sets × images)" if len(shape) == 3 else "(images × captions)"
        raise MetricsError(f"{path}: score matrix of shape {sims.shape}, but this split gives {shape} {what}; "
                           "was it saved for another split, model or --captions-per-image?")
    if not np.isfinite(sims).all():
        raise MetricsError(f"{path}: the score matrix holds NaN or infinite values")
    return sims.astype(np.float32)


def _mean(matrices: list[np.ndarray]) -> np.ndarray:
    return matrices[0] if len(matrices) == 1 else np.mean(matrices, axis=0, dtype=np.float64).astype(np.float32)


def evaluate_checkpoint(
    checkpoint_path: str | os.PathLike | Sequence[str | os.PathLike],
    features: str | os.PathLike,
    data_file: str | os.PathLike,
    *,
    settings: EvaluationSettings | None = None,
    sims_files: Sequence[str | os.PathLike] = (),
    vocab_path: str | os.PathLike | None = None,
    device: str = "auto",
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> EvaluationResult:
    """Score a split's images against its captions (or query sets) and compute the task's metrics.

    Several checkpoints (and score arrays saved by ``--save-sims``) are ensembled by averaging
    their scores, as SGRAF's SAF+SGR ensemble does and as HMRN ensembles its two directions.
    The checkpoints' task decides what `data_file` must be and what is computed. Under torchrun
    the images are shared among the ranks and every rank gets the same result.

    `settings` (`EvaluationSettings`): the split, the protocol, captions per image, batch size,
    memory budget, the scorers' precision (float32, or bf16 autocast around every scoring call:
    docs/evaluation.md) and, for a matching model, `shortlist` = K for two-stage retrieval (the result
    then has no score array, and a `ShortlistReport` per protocol). `log` gets a progress line
    with the ETA every 30 s when no progress bar is shown.
    """
    from extract.runtime import Launch, resolve_device
    from matching.training.distributed import setup, teardown

    settings = (settings or EvaluationSettings()).validate()
    checkpoints = [checkpoint_path] if isinstance(checkpoint_path, (str, os.PathLike)) else list(checkpoint_path)
    if not checkpoints and not sims_files:
        raise MetricsError("nothing to evaluate: give a checkpoint or a saved score matrix")
    loaded = [checkpoint.load(path) for path in checkpoints]  # every file checked before any scoring
    task = _task_of(checkpoints, loaded, data_file)
    if vocab_path is not None:
        for _, _, vocab in loaded:
            check_vocab(vocab, vocab_path)
    store = FeatureStore(features)
    for path, (_, config, _) in zip(checkpoints, loaded, strict=True):
        check_features(store, config.model.img_dim, config.model.num_regions, path)
    data = task.evaluation_data(data_file, settings.split, store, settings, [config for _, config, _ in loaded],
                                sims_files)
    tokens = [task.encode(data, vocab, config) for _, config, vocab in loaded]
    sources = [str(p) for p in sims_files] + [str(p) for p in checkpoints]
    from matching.retrieval.scoring import StoreImages, matmul_precision

    images = StoreImages(store, data.image_ids)
    if settings.shortlist:
        if sims_files:
            raise MetricsError("--shortlist scores only the shortlisted pairs: it cannot be averaged with full "
                               "score matrices (--sims)")
        if Launch.from_env().world_size > 1:
            raise MetricsError("--shortlist runs in one process; start evaluate without torchrun")
        target = resolve_device(device)
        with matmul_precision(settings.precision, target):
            results, reports = task.two_stage([model for model, _, _ in loaded], [config for _, config, _ in loaded],
                                              checkpoints, images, tokens, data, settings, target,
                                              progress=progress, log=log)
        return EvaluationResult(results, None, data.image_ids, data.count, settings.split, sources, task.name,
                                shortlist=reports)
    matrices = [load_sims(path, data.shape) for path in sims_files]
    launch, device_t = setup(device) if loaded else (None, None)
    try:
        for (model, _, _), model_tokens in zip(loaded, tokens, strict=True):
            with matmul_precision(settings.precision, device_t):
                matrices.append(task.score(model, images, model_tokens, data, settings, launch, device_t,
                                           progress=progress, log=log))
    finally:
        if launch is not None:
            teardown(launch)
    sims = _mean(matrices)
    return EvaluationResult(task.metrics(sims, data, settings), sims, data.image_ids, data.count, settings.split,
                            sources, task.name)


def _task_of(checkpoints: list, loaded: list, data_file: str | os.PathLike) -> Any:
    """The task of an evaluation: its checkpoints', which must agree with each other and with the data file."""
    names = {config.task for _, config, _ in loaded}
    if len(names) > 1:
        raise MetricsError("an ensemble mixes tasks: " + ", ".join(
            f"{path} ({config.task})" for path, (_, config, _) in zip(checkpoints, loaded, strict=True)))
    task = get_task(names.pop()) if names else task_of_data(data_file)
    if not task.reads(data_file):
        raise MetricsError(f"{data_file}: a {task.name} checkpoint is evaluated on {task.data_file}")
    return task
