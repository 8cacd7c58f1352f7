"""What a training task supplies to the one training loop of `matching.training.loop`.

Two tasks share the loop (run directory, resume, checkpoints, signals, logs, DDP, collapse
detection): ``matching`` (one caption ↔ one image: TSHSR, HSR, SGR; `matching.training.loop.MatchingTask`)
and ``multi-query`` (several region queries → one image: HMRN;
`matching.tasks.multiquery.MultiQueryTask`). A task says how to read its data, build its
network, cut an epoch into batches, take one optimizer step and validate; the loop does the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import Dataset, Sampler

from extract.runtime import Launch
from extract.shards import FeatureStore
from matching.config import Config
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


class TrainingTask(Protocol):
    """The task-specific parts of training (see the module docstring)."""

    name: str  # a value of matching.config.TASKS
    # metrics.csv's task columns: the step's `parts` and the validation metrics ("rsum" selects the best epoch)
    metric_fields: tuple[str, ...]

    def load_data(self, config: Config, features: Path, data_file: Path, vocab: Vocabulary, train_split: str,
                  val_split: str | None, log: Callable[[str], None]) -> tuple[Config, TrainingData]:
        """Open the data and fit the model config to it (feature width, region count, vocabulary size)."""
        ...

    def build_model(self, config: Config) -> nn.Module:
        """A freshly initialised network for `config.model`."""
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
