"""Training: features + captions + vocabulary → a run directory (DESIGN §5.9; files in `matching.training.rundir`).

`train` is the one entry point (the `train` command, the pipeline's train stage and the
tests call it):

- the run directory belongs to one process (a lock file with its host and pid); a
  directory that holds a run is reused only to `resume` it or with `overwrite`;
- `resume` continues exactly where a killed or interrupted run stopped: the data order
  depends only on (seed, epoch), the checkpoint keeps the RNG states and the position
  inside the epoch, so on the CPU the losses after a resume equal those of an
  uninterrupted run. The saved config wins; the settings asked for (`requested`) may change
  only the fields of `matching.config.RESUMABLE` (more epochs…), anything else is refused
  with the difference;
- `init_from` starts a new run from another checkpoint's weights (fine-tuning);
- SIGINT/SIGTERM stop after the current step with a checkpoint, and the result says which
  signal stopped the run (the command exits 130 or 143);
- every line is logged to the console and to train.log; without a terminal (batch jobs)
  the progress bar gives way to a line every `log_every` steps with the loss, the speed and
  the time left.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader

from extract.runtime import Launch, StopSignals, interactive, progress_bar
from extract.shards import FeatureStore
from matching import checkpoint
from matching.config import RESUMABLE, Config, apply_settings, settings_differences
from matching.data.captions import evaluation_set, read_captions, read_split
from matching.data.pairs import Batch, EpochBatchSampler, PairDataset, build_pairs, collate_pairs
from matching.data.text import Vocabulary
from matching.model.first_stage import first_stage_loss, info_nce_rows
from matching.model.tshsr import TSHSR, build_model
from matching.retrieval.metrics import recall_metrics
from matching.retrieval.scoring import StoreImages
from matching.tasks.base import COLLAPSE_SPREAD, COLLAPSE_STEPS, StepResult, TrainingData, TrainingTask
from matching.training.distributed import (
    GlobalBatchScores,
    agree,
    gather_rows,
    rng_states,
    score_matrix_ranks,
    setup,
    teardown,
)
from matching.training.loss import hardest_negative_loss, hinge_rows
from matching.training.rundir import RECALL_FIELDS, RunDirectory, RunError

__all__ = ["RunError", "TrainResult", "learning_rate", "train", "train_step"]


@dataclass
class TrainResult:
    run_dir: Path
    best_rsum: float
    best_epoch: int
    epochs_done: int
    global_step: int
    losses: list[float] = field(default_factory=list)  # every step of this invocation, in order
    history: list[dict[str, Any]] = field(default_factory=list)  # the metrics rows of this invocation
    interrupted: bool = False  # stopped before the last epoch (a signal or max_steps); --resume continues
    stopped_by: int | None = None  # the signal that stopped the run (SIGINT, SIGTERM), if one did


def learning_rate(config: Config, epoch: int) -> float:
    """Step decay: lr × lr_decay once `epoch` reaches lr_decay_epoch (0-based epochs)."""
    train = config.train
    decay = train.lr_decay if train.lr_decay_epoch and epoch >= train.lr_decay_epoch else 1.0
    return train.learning_rate * decay


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain data, so the checkpoint loads with weights_only."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": _plain(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, (tuple, list)) else value


def _restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- one step


def train_step(model: TSHSR, optimizer: torch.optim.Optimizer, batch: Batch, config: Config,
               device: torch.device, hardest: bool, *, ddp: torch.nn.Module | None = None) -> StepResult:
    """One optimizer step on a batch: the paper's loss of the global batch, the spread of the scores
    computed here and, for a model with a first-stage head, that head's own loss.

    With `ddp` (a DistributedDataParallel(GlobalBatchScores)), this rank holds a slice
    of the global batch: it scores its images against every caption and every image
    against its captions, so the hardest negatives are sought in the whole global batch;
    the per-rank losses sum to the single-process loss of that batch. With
    `train.global_loss_weight` > 0 the same hinge on the global vectors' cosines is added.
    The first-stage head (`matching.model.first_stage`) learns from detached inputs, under its own
    loss and its own gradient clipping: the paper model's step is the same with or without it.
    """
    features = batch.features.to(device, non_blocking=True)
    num_boxes = batch.num_boxes.to(device, non_blocking=True)
    tokens, lengths = batch.tokens.to(device, non_blocking=True), batch.lengths.to(device, non_blocking=True)
    image_index = batch.image_index.to(device)
    amp = config.train.mixed_precision and device.type == "cuda"
    margin, weight = config.train.margin, config.train.global_loss_weight
    temperature = config.train.first_stage_temperature
    head_loss = None
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
        if ddp is None:
            images, captions = model.encode_images(features, num_boxes), model.encode_captions(tokens, lengths)
            scores = model.pair_scores(images, captions)  # (B, B)
            same_image = image_index[:, None] == image_index[None, :]
            loss = hardest_negative_loss(scores.float(), margin, hardest=hardest, same_image=same_image)
            if weight:  # cos(v̄, t̄) under the same hinge, on the paper model's own global vectors
                cosines = model.global_scores(images, captions)
                loss = loss + weight * hardest_negative_loss(cosines, margin, hardest=hardest, same_image=same_image)
            total = loss.detach()
            if model.first_stage is not None:
                head_loss = first_stage_loss(model.image_vectors(images), model.caption_vectors(captions),
                                             temperature, same_image)
                head_total = head_loss.detach()
        else:
            out = ddp(features, num_boxes, tokens, lengths)
            everyone = gather_rows(image_index)  # (G,) the global batch's image of each caption
            offset = int(gather_rows(image_index.new_tensor([len(image_index)]))[: dist.get_rank()].sum())
            positive = offset + torch.arange(len(image_index), device=device)
            same_image = image_index[:, None] == everyone[None, :]  # (b, G)

            def hinge(by_image: Tensor, by_caption: Tensor) -> Tensor:
                return (hinge_rows(by_image.float(), positive, margin, hardest=hardest, not_negative=same_image)
                        + hinge_rows(by_caption.float().t(), positive, margin, hardest=hardest,
                                     not_negative=same_image))

            loss = hinge(out.rows, out.cols)
            if weight:
                loss = loss + weight * hinge(out.global_rows, out.global_cols)
            total = loss.detach().clone()
            dist.all_reduce(total)
            # DDP averages gradients over ranks; the global loss is the sum of the ranks' losses.
            loss = loss * dist.get_world_size()
            scores = out.rows
            if out.head_rows is not None:
                head_loss = (info_nce_rows(out.head_rows.float() / temperature, positive, same_image)
                             + info_nce_rows(out.head_cols.float().t() / temperature, positive, same_image))
                head_total = head_loss.detach().clone()
                dist.all_reduce(head_total)
                head_loss = head_loss * dist.get_world_size()
    (loss if head_loss is None else loss + head_loss).backward()
    if config.train.grad_clip > 0:
        # Each part's gradient norm on its own: the head's never scales the paper model's step.
        torch.nn.utils.clip_grad_norm_(model.paper_parameters(), config.train.grad_clip)
        if model.first_stage is not None:
            torch.nn.utils.clip_grad_norm_(model.first_stage.parameters(), config.train.grad_clip)
    optimizer.step()
    value = float(total)
    if not math.isfinite(value):
        raise FloatingPointError(f"the loss became {value}; lower --lr or disable mixed precision")
    parts = {"first_stage_loss": float(head_total)} if head_loss is not None else {}
    return StepResult(value, float(scores.detach().float().std()), parts)


class MatchingTask:
    """One caption ↔ one image (TSHSR, HSR, SGR): caption/image pairs, the hinge loss, recall and rsum."""

    name = "matching"
    metric_fields = ("first_stage_loss", *RECALL_FIELDS, "rsum")

    def load_data(self, config: Config, features: Path, data_file: Path, vocab: Vocabulary, train_split: str,
                  val_split: str | None, log: Callable[[str], None]) -> tuple[Config, TrainingData]:
        """Open the data, fit the model config to it (region count, feature width, vocabulary size),
        and build the train set and the validation set (image ids, their captions' tokens)."""
        store = FeatureStore(features)
        # Region count and feature width are facts of the data, not choices.
        config = config.updated(model={"img_dim": store.feature_dim, "num_regions": store.max_boxes,
                                       "vocab_size": len(vocab)})
        pairs = build_pairs(read_split(data_file, train_split, "training"), store.image_ids, vocab)
        dataset = PairDataset(store, pairs, in_memory=config.train.features_in_memory)
        validation = None
        if not val_split:
            log("note: no validation split (--val-split ''): model_best.pt is the last epoch")
        else:
            # Unsplit captions are training data; validation needs captions marked as the val split.
            val_captions = [c for c in read_captions(data_file, val_split) if c.split is not None]
            if not val_captions:
                log(f"note: {data_file} has no captions marked '{val_split}': no validation; "
                    "model_best.pt is the last epoch")
            else:
                image_ids, ordered = evaluation_set(val_captions, store.image_ids, config.train.captions_per_image)
                if config.train.val_images:
                    image_ids = image_ids[: config.train.val_images]
                    ordered = ordered[: len(image_ids) * config.train.captions_per_image]
                validation = (image_ids, [vocab.encode(c.text) for c in ordered])
        return config, TrainingData(store, dataset, validation)

    def build_model(self, config: Config) -> TSHSR:
        return build_model(config.model)

    def batches(self, data: TrainingData, config: Config, launch: Launch) -> tuple[EpochBatchSampler, Callable]:
        sampler = EpochBatchSampler([len(c) for c in data.dataset.pairs.captions],
                                    config.train.batch_size * launch.world_size, seed=config.train.seed,
                                    length_buckets=config.train.length_buckets, num_replicas=launch.world_size,
                                    rank=launch.rank)
        return sampler, collate_pairs

    def distributed_module(self, model: TSHSR) -> torch.nn.Module:
        return GlobalBatchScores(model)

    def step(self, model: TSHSR, optimizer: torch.optim.Optimizer, batch: Batch, config: Config,
             device: torch.device, epoch: int, ddp: torch.nn.Module | None) -> StepResult:
        return train_step(model, optimizer, batch, config, device, _hardest(config, epoch), ddp=ddp)

    def validate(self, model: TSHSR, data: TrainingData, config: Config, device: torch.device,
                 launch: Launch) -> dict[str, float]:
        return validate(model, data, config, device, launch)

    def summary(self, row: dict[str, Any], config: Config) -> str:
        negatives = "hardest" if _hardest(config, int(row["epoch"]) - 1) else "all"
        line = f"{negatives} negatives"
        if "first_stage_loss" in row:
            line += f", first stage {row['first_stage_loss']:.3f}"
        if "rsum" in row:
            line += (f" | val i2t R@1 {row['i2t_r1']:.1f} R@5 {row['i2t_r5']:.1f} R@10 {row['i2t_r10']:.1f}, "
                     f"t2i R@1 {row['t2i_r1']:.1f} R@5 {row['t2i_r5']:.1f} R@10 {row['t2i_r10']:.1f}, "
                     f"rsum {row['rsum']:.1f}")
        return line

    def collapse_hint(self, spread: float, loss: float, batch_size: int, config: Config, epoch: int) -> str:
        """Why the scores stopped spreading and what to change, from this run's loss and settings."""
        train = config.train
        hardest = _hardest(config, epoch)
        margin, weight = train.margin, train.global_loss_weight
        # Every score equal: each query's hinge is the margin, once (hardest) or for each of its B−1 negatives.
        terms = 2 * batch_size * (1 if hardest else batch_size - 1)
        collapsed = terms * margin
        formula = "2·B·margin" if hardest else "2·B·(B−1)·margin"
        phase = "hardest negatives" if hardest else f"warm-up epoch {epoch + 1}: the hinge summed over all negatives"
        line = (f"warning: training has collapsed: every pair has scored the same for {COLLAPSE_STEPS} steps "
                f"(score spread {spread:.1e}, batch of {batch_size}, {phase}). ")
        if weight:
            line += (f"The loss, {loss:.1f}, is the paper's hinge at its collapsed value {formula} = {collapsed:.1f} "
                     f"plus {weight:g} × the global loss on cos(v̄, t̄). ")
        elif abs(loss - collapsed) <= 0.02 * collapsed:
            line += f"The loss sits at its collapsed value {formula} = {collapsed:.1f}. "
        else:
            line += f"The loss is {loss:.1f} ({formula} = {collapsed:.1f} once every score is equal). "
        remedies = []
        if weight:
            remedies.append(f"the global loss (--global-loss-weight {weight:g}) shares the encoders with the model "
                            "and can drown its gradient: set it to 0 (the first-stage head trains the shortlist "
                            "without touching the model)")
        if hardest and train.warmup_epochs == 0:
            remedies.append("hardest negatives from the first step collapse easily on small data: sum the hinge over "
                            "all negatives first (--warmup-epochs 2 or more, until validation recall has climbed)")
        elif hardest:
            remedies.append(f"the switch to hardest negatives after {train.warmup_epochs} warm-up epoch(s) came before "
                            f"the model had learned enough: --warmup-epochs {train.warmup_epochs + 2} or more")
        else:
            remedies.append(f"it collapsed while summing all negatives, so more warm-up will not help: lower --lr "
                            f"(now {train.learning_rate:g}) or check that the captions describe their images")
        return line + "Remedy: " + "; ".join(remedies) + "."


def _hardest(config: Config, epoch: int) -> bool:
    """Hardest negatives after the warm-up epochs (which sum the hinge over all negatives)."""
    return config.train.hardest_negatives and epoch >= config.train.warmup_epochs


def validate(model: TSHSR, data: TrainingData, config: Config, device: torch.device,
             launch: Launch | None = None) -> dict[str, float]:
    """Recall metrics on the validation images (all of them against all their captions).

    Under torchrun the images are shared among the ranks and every rank gets the metrics.
    """
    image_ids, tokens = data.validation
    sims = score_matrix_ranks(model, StoreImages(data.store, image_ids), tokens, launch or Launch(), device,
                              batch_size=max(config.train.batch_size, 32))
    return recall_metrics(sims, config.train.captions_per_image)


def task_for(name: str) -> TrainingTask:
    """The training task of a config's `task`."""
    if name == "multi-query":
        from matching.tasks.multiquery import MultiQueryTask

        return MultiQueryTask()
    return MatchingTask()


# --------------------------------------------------------------------------- the run


def train(
    config: Config,
    *,
    features: str | os.PathLike,
    captions: str | os.PathLike,
    vocab_path: str | os.PathLike,
    run_dir: str | os.PathLike,
    resume: bool = False,
    overwrite: bool = False,
    init_from: str | os.PathLike | None = None,
    requested: Mapping[str, Any] | None = None,
    device: str = "auto",
    train_split: str = "train",
    val_split: str | None = "val",
    max_steps: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train a model into `run_dir`; returns where it is and how it did.

    Started by torchrun (``torchrun --nproc_per_node=N -m pipelines.cli train …``), the
    processes train together with DistributedDataParallel: `batch_size` is each
    process's share, the loss sees the global batch of N × batch_size, and only
    rank 0 writes files and logs.

    Args:
        config: the recipe and the model (img_dim, num_regions and vocab_size are
            taken from the data). Ignored when resuming: the saved config wins.
        features, captions, vocab_path: the data.
        run_dir: the run directory; it must not hold a run unless `resume` or `overwrite`.
        resume: continue the run in `run_dir` from its checkpoint_last.pt.
        overwrite: delete the run files already in `run_dir` and start again.
        init_from: a checkpoint whose model config and weights start this run.
        requested: the settings the caller asked for explicitly (``{"train.epochs": 3}``): on
            resume they are compared with the saved config; with `init_from` the model fields
            among them override the checkpoint's.
        device: auto, cpu, cuda or cuda:N.
        max_steps: stop (with a checkpoint, as if interrupted) after this many
            optimizer steps of this invocation.
        progress: a progress bar on a terminal (else a log line every `log_every` steps).
        log: where the console lines go (train.log gets them too).
    """
    if resume and overwrite:
        raise RunError("--resume and --overwrite contradict each other: choose one")
    if resume and init_from:
        raise RunError("--resume continues a run with its own weights; --init-from starts a new run")
    launch, device_t = setup(device)
    run = RunDirectory(Path(run_dir))
    try:
        with run.lock() if launch.is_main else contextlib.nullcontext():
            if launch.is_main:
                _check_reuse(run, resume, overwrite)

            def say(line: str) -> None:
                if launch.is_main:
                    log(line)
                    run.log(line)

            session = _Session.start(config, run=run, launch=launch, device=device_t, features=Path(features),
                                     captions=Path(captions), vocab_path=Path(vocab_path), resume=resume,
                                     init_from=init_from, requested=dict(requested or {}),
                                     train_split=train_split, val_split=val_split, log=say)
            return session.fit(max_steps=max_steps, progress=progress and launch.is_main)
    finally:
        teardown(launch)


def _check_reuse(run: RunDirectory, resume: bool, overwrite: bool) -> None:
    """A directory holding a run is reused only to resume it, or emptied with --overwrite."""
    if resume:
        if not run.last.exists():
            found = ", ".join(p.name for p in run.run_files())
            raise RunError(f"{run.path}: nothing to resume (no {run.last.name}"
                           + (f"; the directory holds {found}: the run stopped before its first checkpoint)"
                              if found else ")"))
        return
    existing = run.run_files()
    if existing and overwrite:
        run.clear()
    elif existing:
        names = ", ".join(p.name for p in existing[:4]) + (", …" if len(existing) > 4 else "")
        raise RunError(f"{run.path}: a run already exists here ({names}); pass --resume to continue it, "
                       "--overwrite to start again, or choose another --name")


def _describe(config: Config) -> list[str]:
    """The resolved config in two log lines."""
    sections = config.to_dict()
    return [f"config {section}: " + ", ".join(f"{k}={v}" for k, v in sections[section].items())
            for section in ("model", "train")] + ([f"config task: {config.task}"] if config.task != "matching" else [])


class _Session:
    """Everything one invocation of `train` holds: model, optimizer, data, position and best so far."""

    def __init__(self, *, task: TrainingTask, config: Config, run: RunDirectory, launch: Launch,
                 device: torch.device, vocab: Vocabulary, data: TrainingData, log: Callable[[str], None]) -> None:
        self.task, self.config, self.run, self.launch, self.device = task, config, run, launch, device
        self.vocab, self.data, self.log = vocab, data, log
        self.epoch = self.batch_in_epoch = self.global_step = 0
        self.best_rsum, self.best_epoch = -1.0, -1
        self.epoch_loss, self.epoch_steps = 0.0, 0
        self.epoch_parts: dict[str, float] = {}  # sums over the epoch's steps of the losses besides the main one
        seed_everything(config.train.seed)
        self.model = task.build_model(config).to(device)
        self.ddp = None
        if launch.distributed:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(task.distributed_module(self.model),
                                               device_ids=[device.index] if device.type == "cuda" else None)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.train.learning_rate)

    # ------------------------------------------------------------------ setup

    @classmethod
    def start(cls, config: Config, *, run: RunDirectory, launch: Launch, device: torch.device, features: Path,
              captions: Path, vocab_path: Path, resume: bool, init_from: str | os.PathLike | None,
              requested: dict[str, Any], train_split: str, val_split: str | None,
              log: Callable[[str], None]) -> _Session:
        """Resolve the config (saved, requested, init checkpoint), load the data, build or restore the model."""
        state = checkpoint.load_payload(run.last) if resume else None
        source = checkpoint.load_payload(init_from) if init_from else None
        if state is not None:
            config = _resumed_config(Config.from_checkpoint(state["config"]), requested, run, log)
        else:
            config.train.validate()
            if source is not None:
                config = _fine_tuning_config(config, Config.from_checkpoint(source["config"]), requested, init_from)
        task = task_for(config.task)
        vocab = Vocabulary.load(vocab_path)
        for payload, what in ((state, str(run.path)), (source, str(init_from))):
            if payload is not None and Vocabulary(payload["vocab"]) != vocab:
                raise RunError(f"{vocab_path}: not the vocabulary {what} was trained with")
        fitted, data = task.load_data(config, features, captions, vocab, train_split, val_split, log)
        for payload, what in ((state, str(run.path)), (source, str(init_from))):
            if payload is not None:
                _check_same_data(Config.from_checkpoint(payload["config"]), fitted, features, what)
        config = fitted
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = config.train.allow_tf32
            torch.backends.cudnn.allow_tf32 = config.train.allow_tf32
        if launch.is_main:
            run.write_config(config)
        for line in _describe(config):
            log(line)
        if launch.distributed:
            log(f"{launch.world_size} processes × batch {config.train.batch_size} = global batch "
                f"{launch.world_size * config.train.batch_size}")
        session = cls(task=task, config=config, run=run, launch=launch, device=device, vocab=vocab, data=data,
                      log=log)
        if state is not None:
            session._restore(state)
        elif source is not None:
            session.model.load_state_dict(source["model"])
            log(f"starting from the weights of {init_from}")
        return session

    def _restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        progress = state["progress"]
        self.epoch, self.batch_in_epoch = progress["epoch"], progress["batch_in_epoch"]
        self.global_step, self.best_rsum = progress["global_step"], progress["best_rsum"]
        self.best_epoch = progress["best_epoch"]
        self.epoch_loss, self.epoch_steps = progress["epoch_loss"], progress["epoch_steps"]
        self.epoch_parts = dict(progress.get("epoch_parts", {}))
        saved = state["rng"]["ranks"]
        if len(saved) != self.launch.world_size:
            self.log(f"note: the run was saved by {len(saved)} processes and resumes on {self.launch.world_size}: "
                     "the data order and dropout differ from an uninterrupted run from here on")
        _restore_rng(saved[self.launch.rank % len(saved)])
        if self.launch.is_main:  # a crash between an epoch's metrics row and its checkpoint
            self.run.keep_metrics_until(self.epoch)
        self.log(f"resuming {self.run.path} at epoch {self.epoch + 1}, batch {self.batch_in_epoch}, "
                 f"step {self.global_step}")

    # ------------------------------------------------------------------ saving

    def save_last(self) -> None:
        """checkpoint_last.pt: a collective (every rank's RNG state); rank 0 writes."""
        states = rng_states(self.launch, _rng_state())
        if self.launch.is_main:
            checkpoint.save(self.run.last, self.model, self.config, self.vocab,
                            optimizer=self.optimizer.state_dict(), rng={"ranks": states},
                            progress={"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                                      "global_step": self.global_step, "best_rsum": self.best_rsum,
                                      "best_epoch": self.best_epoch, "epoch_loss": self.epoch_loss,
                                      "epoch_steps": self.epoch_steps, "epoch_parts": dict(self.epoch_parts),
                                      "world_size": self.launch.world_size})

    # ------------------------------------------------------------------ the loop

    def fit(self, *, max_steps: int | None, progress: bool) -> TrainResult:
        config, launch = self.config, self.launch
        sampler, collate = self.task.batches(self.data, config, launch)
        # The loader draws a worker seed from its generator at every epoch start; a generator of
        # its own keeps that draw off the global RNG that dropout uses, so a resume mid-epoch
        # continues the very same dropout masks.
        loader = DataLoader(self.data.dataset, batch_sampler=sampler, collate_fn=collate,
                            num_workers=config.train.workers, pin_memory=self.device.type == "cuda",
                            persistent_workers=config.train.workers > 0,
                            generator=torch.Generator().manual_seed(config.train.seed))
        writer = _tensorboard(self.run.path, self.global_step) if launch.is_main else _NoWriter()
        result = TrainResult(self.run.path, self.best_rsum, self.best_epoch, self.epoch, self.global_step)
        if self.epoch >= config.train.epochs:
            self.log(f"nothing to do: the run has trained all {config.train.epochs} epochs "
                     "(--resume --epochs N trains more)")
        bars = progress and interactive()
        clock = _Clock(config.train.epochs)
        collapsed = 0
        try:
            with StopSignals() as stop:
                while self.epoch < config.train.epochs:
                    lr = learning_rate(config, self.epoch)
                    for group in self.optimizer.param_groups:
                        group["lr"] = lr
                    sampler.set_epoch(self.epoch, self.batch_in_epoch)
                    steps_in_epoch = self.batch_in_epoch + len(sampler)
                    self.model.train()
                    bar = progress_bar(len(sampler), f"epoch {self.epoch + 1}/{config.train.epochs}", "step",
                                       enabled=bars)
                    for batch in loader:
                        outcome = self.task.step(self.model, self.optimizer, batch, config, self.device,
                                                 self.epoch, self.ddp)
                        loss, spread = outcome.loss, outcome.spread
                        self.global_step += 1
                        self.batch_in_epoch += 1
                        self.epoch_loss += loss
                        for name, value in outcome.parts.items():
                            self.epoch_parts[name] = self.epoch_parts.get(name, 0.0) + value
                        self.epoch_steps += 1
                        result.losses.append(loss)
                        pairs = len(batch.num_boxes) * launch.world_size
                        clock.step(pairs)
                        writer.add_scalar("train/loss", loss, self.global_step)
                        collapsed = collapsed + 1 if spread < COLLAPSE_SPREAD else 0
                        if collapsed == COLLAPSE_STEPS:
                            self.log(self.task.collapse_hint(spread, loss, pairs, config, self.epoch))
                        bar.update(1)
                        bar.set_postfix(loss=f"{loss:.3f}", pairs_s=f"{clock.pairs_per_second():.0f}")
                        every = config.train.log_every
                        if not bars and every and self.batch_in_epoch % every == 0:
                            self.log(clock.line(self.epoch, self.batch_in_epoch, steps_in_epoch, loss,
                                                self.epoch_loss / max(self.epoch_steps, 1), lr))
                        stop_now = agree(launch, stop.requested or (max_steps is not None
                                                                    and len(result.losses) >= max_steps),
                                         self.device)
                        if stop_now or (config.train.checkpoint_every
                                        and self.global_step % config.train.checkpoint_every == 0):
                            self.save_last()
                        if stop_now:
                            bar.close()
                            why = "--max-steps" if stop.signum is None else signal.Signals(stop.signum).name
                            self.log(f"stopped at epoch {self.epoch + 1}, step {self.global_step}; continue with "
                                     f"--resume (checkpoint {self.run.last}; stopped by {why})")
                            result.interrupted, result.stopped_by = True, stop.signum
                            return self._finish(result)
                    bar.close()
                    self._end_epoch(result, lr, clock, writer)
        finally:
            writer.close()
        return self._finish(result)

    def _end_epoch(self, result: TrainResult, lr: float, clock: _Clock, writer: Any) -> None:
        """Validate, keep the best model, record the epoch's row, checkpoint."""
        row: dict[str, Any] = {"epoch": self.epoch + 1, "step": self.global_step, "lr": lr,
                               "train_loss": self.epoch_loss / max(self.epoch_steps, 1)}
        row.update({name: total / max(self.epoch_steps, 1) for name, total in self.epoch_parts.items()})
        improved = self.data.validation is None
        if self.data.validation is not None:
            metrics = self.task.validate(self.model, self.data, self.config, self.device, self.launch)
            row.update({k: metrics[k] for k in self.task.metric_fields if k in metrics})
            improved = metrics["rsum"] > self.best_rsum
            for key, value in metrics.items():
                writer.add_scalar(f"val/{key}", value, self.global_step)
        if improved:
            self.best_rsum, self.best_epoch = float(row.get("rsum", 0.0)), self.epoch + 1
            if self.launch.is_main:
                checkpoint.save(self.run.best, self.model, self.config, self.vocab,
                                best={"epoch": self.best_epoch, "rsum": self.best_rsum})
        row.update({"best_rsum": self.best_rsum, "seconds": round(clock.elapsed(), 1)})
        if self.launch.is_main:
            self.run.append_metrics(row, self.task.metric_fields)
        result.history.append(row)
        line = (f"epoch {row['epoch']}/{self.config.train.epochs}: loss {row['train_loss']:.4f}, lr {row['lr']:.1e}, "
                f"{self.task.summary(row, self.config)}")
        best = " (best)" if improved and self.data.validation is not None else ""
        self.log(f"{line}{best} [{row['seconds']:.0f}s]")
        self.epoch, self.batch_in_epoch, self.epoch_loss, self.epoch_steps = self.epoch + 1, 0, 0.0, 0
        self.epoch_parts = {}
        self.save_last()

    def _finish(self, result: TrainResult) -> TrainResult:
        result.best_rsum, result.best_epoch = self.best_rsum, self.best_epoch
        result.epochs_done, result.global_step = self.epoch, self.global_step
        if not result.interrupted:
            best = (f"best rsum {self.best_rsum:.1f} at epoch {self.best_epoch}; " if self.best_rsum >= 0 else "")
            self.log(f"done: {self.epoch} epochs, {self.global_step} steps; {best}model in {self.run.best}")
        return result


def _resumed_config(saved: Config, requested: dict[str, Any], run: RunDirectory,
                    log: Callable[[str], None]) -> Config:
    """The saved config with the requested changes that a resume allows; RunError listing the others."""
    differences = settings_differences(saved, requested)
    fixed = {k: v for k, v in differences.items() if k not in RESUMABLE}
    if fixed:
        listed = "; ".join(f"{k}: run has {old!r}, asked {new!r}" for k, (old, new) in sorted(fixed.items()))
        raise RunError(f"{run.path}: --resume cannot change {listed}. A resumed run keeps its settings "
                       f"(only {', '.join(sorted(k.split('.')[1] for k in RESUMABLE))} may change); start "
                       "a new run with --init-from to fine-tune from it, or --overwrite")
    for key, (old, new) in sorted(differences.items()):
        log(f"resume: {key} {old} → {new}")
    return apply_settings(saved, {k: requested[k] for k in differences})


def _fine_tuning_config(config: Config, source: Config, requested: dict[str, Any],
                        init_from: str | os.PathLike) -> Config:
    """A new run from another checkpoint: its task and model config, the model fields asked for, this recipe."""
    if source.task != config.task:
        raise RunError(f"{init_from}: a {source.task} checkpoint cannot start a {config.task} run")
    model_fields = {k: v for k, v in requested.items() if k.startswith("model.")}
    return apply_settings(config.updated(model=source.to_dict()["model"]), model_fields)


def _check_same_data(saved: Config, fitted: Config, features: Path, what: str) -> None:
    """A resumed or fine-tuned model reads features of the width and region count it was built for."""
    for name in ("img_dim", "num_regions"):
        if getattr(saved.model, name) != getattr(fitted.model, name):
            raise RunError(f"{features}: the features give model.{name} = {getattr(fitted.model, name)}, "
                           f"but {what} was trained with {getattr(saved.model, name)}")


class _Clock:
    """Speed and time left, for the progress bar and the batch-job log lines."""

    def __init__(self, epochs: int) -> None:
        self.started = time.monotonic()
        self.epochs = epochs
        self.steps = 0
        self.pairs = 0

    def step(self, pairs: int) -> None:
        self.steps += 1
        self.pairs += pairs

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def pairs_per_second(self) -> float:
        return self.pairs / max(self.elapsed(), 1e-9)

    def line(self, epoch: int, batch: int, steps_in_epoch: int, loss: float, mean_loss: float, lr: float) -> str:
        per_step = self.elapsed() / max(self.steps, 1)
        left_epoch = (steps_in_epoch - batch) * per_step
        left_run = left_epoch + (self.epochs - epoch - 1) * steps_in_epoch * per_step
        return (f"epoch {epoch + 1}/{self.epochs} step {batch}/{steps_in_epoch}: loss {loss:.4f} "
                f"(epoch mean {mean_loss:.4f}), {self.pairs_per_second():.1f} pairs/s, lr {lr:.1e}, "
                f"epoch ends in {_duration(left_epoch)}, run in {_duration(left_run)} (without validation)")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


class _NoWriter:
    def add_scalar(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _tensorboard(run_dir: Path, step: int) -> Any:
    """TensorBoard event files when the tensorboard package is installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return _NoWriter()
    return SummaryWriter(str(run_dir), purge_step=step or None)
