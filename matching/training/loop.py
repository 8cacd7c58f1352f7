"""Training: features + captions + vocabulary → a run directory (files in `matching.training.rundir`).

`train` is the one entry point (the `train` command, the pipeline's train stage and the
tests call it), and the one loop of every task (`matching.tasks`): the task supplies the
data, the network, the batches, the optimizer step and the validation; the loop does the rest.

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
from torch.utils.data import DataLoader

from extract.runtime import Launch, StopSignals, interactive, progress_bar
from matching import checkpoint
from matching.config import RESUMABLE, Config, apply_settings, settings_differences
from matching.data.text import Vocabulary
from matching.tasks import get_task
from matching.tasks.base import COLLAPSE_SPREAD, COLLAPSE_STEPS, Task, TrainingData
from matching.training.distributed import (
    agree,
    rng_states,
    setup,
    teardown,
)
from matching.training.rundir import RunDirectory, RunError

__all__ = ["RunError", "TrainResult", "learning_rate", "train", "train_from_choices"]


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


def train_from_choices(*, features: str | os.PathLike, captions: str | os.PathLike, vocab_path: str | os.PathLike,
                       runs_dir: str | os.PathLike = "runs", name: str | None = None, task: str | None = None,
                       preset: str | None = None, config_file: str | os.PathLike | None = None,
                       variant: str | None = None, flags: dict[str, Any] | None = None,
                       sets: list[str] | tuple[str, ...] = (), resume: bool = False, **options: Any) -> TrainResult:
    """`train` from a user's choices as the `train` command takes them.

    The config from `matching.config.plan_run` (task, preset, config file, variant, the direct
    flags of `TRAIN_FLAGS`, ``--set``); the run goes to RUNS_DIR/NAME (default: the variant or
    the task's prefix and the time). `options`: the rest of `train`'s keyword arguments.
    """
    from matching.config import plan_run
    from matching.training.rundir import new_run_name

    if resume and not name:
        raise RunError("--resume needs --name (the run to continue)")
    config, requested = plan_run(task=task, preset=preset, config_file=str(config_file) if config_file else None,
                                 variant=variant, flags=flags, sets=sets)
    run_dir = Path(runs_dir) / (name or new_run_name(variant or get_task(config.task).run_prefix))
    return train(config, features=features, captions=captions, vocab_path=vocab_path, run_dir=run_dir,
                 resume=resume, requested=requested, **options)


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
            for section in ("model", "train")] + [f"config task: {config.task}"]


class _Session:
    """Everything one invocation of `train` holds: model, optimizer, data, position and best so far."""

    def __init__(self, *, task: Task, config: Config, run: RunDirectory, launch: Launch,
                 device: torch.device, vocab: Vocabulary, data: TrainingData, log: Callable[[str], None]) -> None:
        self.task, self.config, self.run, self.launch, self.device = task, config, run, launch, device
        self.vocab, self.data, self.log = vocab, data, log
        self.epoch = self.batch_in_epoch = self.global_step = 0
        self.best_rsum, self.best_epoch = -1.0, -1
        self.epoch_loss, self.epoch_steps = 0.0, 0
        self.epoch_parts: dict[str, float] = {}  # sums over the epoch's steps of the losses besides the main one
        seed_everything(config.train.seed)
        self.model = task.build_model(config.model).to(device)
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
        task = get_task(config.task)
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
