"""The interface every task implements: what is task-specific from the config to the service's answer.

The shared machinery calls a task for everything that differs between tasks and never asks which
task it holds: the one training loop (`matching.training.loop`: run directory, resume, signals,
logs, DDP, collapse detection), checkpoints (`matching.checkpoint`), evaluation
(`matching.retrieval.evaluate`), the search engine of `search` and `serve`
(`matching.retrieval.search`), the vocabulary builder and the commands. A task says which config
class its network has, how to read its data files, how to build its network, how to cut an
epoch into batches, take one optimizer step and validate, how to score a test split and turn the
scores into metrics and a table, and how to rank a gallery for a search and show a hit's regions.
Registering a task: `matching.tasks.REGISTRY`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Sampler

from extract.runtime import Launch
from extract.shards import FeatureStore
from matching.config import Config, EvaluationSettings
from matching.data.text import Vocabulary

COLLAPSE_SPREAD = 1e-4  # score std below this across a batch means every pair scores the same
COLLAPSE_STEPS = 20  # consecutive collapsed steps before the warning


@dataclass
class StepResult:
    """What one optimizer step reports to the loop."""

    loss: float  # the task's loss of the global batch (what the log and the progress bar show)
    spread: float  # the std of the batch's scores, for collapse detection
    parts: dict[str, float] = field(default_factory=dict)  # other losses trained in the step (per-epoch means logged)


@dataclass
class TrainingData:
    """A task's training set and validation set, opened once per run."""

    store: FeatureStore
    dataset: Dataset  # items for the task's collate function
    validation: Any | None  # what the task's `validate` needs, or None (no validation split)


@dataclass
class EvaluationData:
    """A test split as a task scores it: the images, what is ranked against them, the scores' shape."""

    image_ids: list[str]  # the gallery, in score order
    texts: list[Any]  # what each model encodes with its own vocabulary (captions; query sets)
    shape: tuple[int, ...]  # of the score array (matching: images × captions; multi-query: rounds × sets × images)
    count: int  # captions or query sets
    left_out: int = 0  # texts of the split the protocol does not rank (HMRN's: the sets beyond its whole tiles)


@dataclass
class Ranking:
    """A search's candidates and their scores after each round of queries, as a task ranks them."""

    positions: np.ndarray  # (c,) gallery positions the model scored (every image, or a shortlist)
    scores: np.ndarray  # (c, R) the score of each candidate after rounds 1…R (R = the number of queries)
    queries: Any = None  # the queries as the model encoded them, for `Task.regions` (None: encode again)


class Task(Protocol):
    """Everything task-specific (see the module docstring)."""

    name: str  # its key in matching.tasks.REGISTRY; saved in every config and checkpoint
    model_config: type  # the dataclass of its network's config (ModelConfig, MultiQueryConfig, …)
    recipe: dict[str, Any]  # TrainConfig fields that make its default recipe ({}: the paper's)
    variants: dict[str, dict[str, Any]]  # named model configs for --variant ({}: none)
    legacy_fields: dict[str, Any]  # "section.field" → the value a checkpoint saved before the field existed means
    run_prefix: str  # the default run name's prefix
    data_file: str  # what its data file is, for messages ("a caption file (…)")
    unit: str  # what is ranked against the images in an evaluation: "captions", "query sets"
    combination: str  # how a search's rounds of queries combine ("mean" of one-query scores, the model's "rounds")
    # metrics.csv's task columns: the step's `parts` and the validation metrics ("rsum" selects the best epoch)
    metric_fields: tuple[str, ...]

    # ------------------------------------------------------------------ data and network

    def reads(self, path: str | os.PathLike) -> bool:
        """Whether `path` is this task's kind of data file."""
        ...

    def vocabulary_texts(self, path: str | os.PathLike, splits: Sequence[str] | None) -> list[str]:
        """The texts a vocabulary is counted from (`splits`, or the task's default ones)."""
        ...

    def text_wrap(self, config: Config) -> str:
        """How the model of `config` wraps a text's token ids (`matching.config.TEXT_WRAPS`), for every text it
        reads: training, evaluation and search."""
        ...

    def gallery(self, path: str | os.PathLike, split: str | None) -> tuple[set[str], list[Any]]:
        """(the image ids of a data file's split, the captions an image can be described with — none for
        a task that only ranks images)."""
        ...

    def build_model(self, config: Any) -> nn.Module:
        """A freshly initialised network for a model config of this task (`model_config`)."""
        ...

    def has_first_stage(self, config: Config) -> bool:
        """Whether a model of this config has trained vectors for the two-stage shortlist."""
        ...

    # ------------------------------------------------------------------ training

    def load_data(self, config: Config, features: Path, data_file: Path, vocab: Vocabulary, train_split: str,
                  val_split: str | None, log: Callable[[str], None]) -> tuple[Config, TrainingData]:
        """Open the data and fit the model config to it (feature width, region count, vocabulary size)."""
        ...

    def batches(self, data: TrainingData, config: Config, launch: Launch) -> tuple[Sampler, Callable]:
        """(the epoch's batch sampler, with set_epoch(epoch, start_batch); the collate function)."""
        ...

    def distributed_module(self, model: nn.Module) -> nn.Module:
        """The module DistributedDataParallel wraps (it must compute what the loss needs of the global batch)."""
        ...

    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer, batch: Any, config: Config,
             device: torch.device, epoch: int, ddp: nn.Module | None) -> StepResult:
        """One optimizer step: the global batch's loss, the spread of the scores, any other losses."""
        ...

    def validate(self, model: nn.Module, data: TrainingData, config: Config, device: torch.device,
                 launch: Launch) -> dict[str, float]:
        """The validation metrics (every key of `metric_fields`, "rsum" among them); all ranks get them."""
        ...

    def summary(self, row: dict[str, Any], config: Config) -> str:
        """The epoch line's task part (the loss used, the validation metrics), from a metrics row."""
        ...

    def collapse_hint(self, spread: float, loss: float, batch_size: int, config: Config, epoch: int) -> str:
        """What the log says when every pair has scored the same for `COLLAPSE_STEPS` steps: the reason and the
        remedy that fit this run's loss and settings (`epoch`: the current one, 0-based)."""
        ...

    # ------------------------------------------------------------------ evaluation

    def evaluation_data(self, path: str | os.PathLike, split: str | None, store: FeatureStore,
                        settings: EvaluationSettings, configs: Sequence[Config],
                        sims_files: Sequence[str | os.PathLike]) -> EvaluationData:
        """The test split: its images and texts, checked against the protocol before any scoring."""
        ...

    def encode(self, data: EvaluationData, vocab: Vocabulary, config: Config) -> list[Any]:
        """The split's texts as token ids of one model's vocabulary, wrapped as that model (`config`) reads them."""
        ...

    def score(self, model: nn.Module, images: Any, tokens: list[Any], data: EvaluationData,
              settings: EvaluationSettings, launch: Launch, device: torch.device, *, progress: bool,
              log: Callable[[str], None] | None) -> np.ndarray:
        """One model's scores of the split (`data.shape`); under torchrun every rank gets all of them."""
        ...

    def metrics(self, scores: np.ndarray, data: EvaluationData, settings: EvaluationSettings) -> dict[str, Any]:
        """The metrics of a score array (an ensemble's mean), as the metrics file holds them."""
        ...

    def two_stage(self, models: Sequence[nn.Module], configs: Sequence[Config], sources: Sequence[Any], images: Any,
                  tokens: Sequence[list[Any]], data: EvaluationData, settings: EvaluationSettings,
                  device: torch.device, *, progress: bool,
                  log: Callable[[str], None] | None) -> tuple[dict[str, Any], dict[str, Any]]:
        """Metrics by two-stage retrieval (`settings.shortlist`) and the shortlist's report per protocol;
        NoFirstStageError for a model without a trained first stage (named by its `sources` entry),
        MetricsError for a task whose models score every image."""
        ...

    def table(self, results: dict[str, Any], reports: dict[str, Any] | None, n_images: int) -> str:
        """The metrics as the evaluate command prints them."""
        ...

    # ------------------------------------------------------------------ search

    def ranker(self, model: nn.Module, gallery: Any, device: torch.device, shortlist: int, batch_size: int) -> Any:
        """What ranks the gallery for a search (`matching.retrieval.search.Ranker`); `shortlist` > 0: the images
        a query re-ranks after the first stage, 0: every image."""
        ...

    def regions(self, model: nn.Module, images: Any, queries: list[list[int]], ranking: Ranking) -> np.ndarray:
        """How much the queries attend to each region of already encoded images (n, K), for display."""
        ...

    def caption_scores(self, model: nn.Module, image: Any, captions: Any) -> np.ndarray:
        """One encoded image's scores against an encoded caption gallery; QueryError for a task that ranks
        only images."""
        ...
