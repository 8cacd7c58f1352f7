"""Training: features + captions + vocabulary → ``runs/NAME/`` (DESIGN §5.9, issue "Training").

A run directory holds::

    config.yaml          the resolved Config
    checkpoint_last.pt   model, optimizer, epoch, step, RNG states: resume point
    model_best.pt        the best epoch by validation rsum (a plain checkpoint)
    metrics.csv          one row per epoch
    train.log            the log lines printed to the console
    events.*             TensorBoard scalars (loss per step, metrics per epoch)

`--resume` continues exactly where a killed or interrupted run stopped: the
data order depends only on (seed, epoch), the checkpoint keeps the RNG
states and the position inside the epoch, so on the CPU the losses after a
resume equal those of an uninterrupted run.
"""

from __future__ import annotations

import csv
import math
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.utils.data import DataLoader

from extract.shards import FeatureStore
from matching import checkpoint
from matching.captions import evaluation_set, read_captions
from matching.config import Config
from matching.data import Batch, LengthBucketSampler, PairDataset, build_pairs, collate_pairs
from matching.distributed import (
    DistContext,
    GlobalBatchScores,
    agree,
    convert_batchnorm,
    gather_rows,
    rng_states,
    score_matrix_ranks,
    setup,
    teardown,
)
from matching.evaluation import recall_metrics
from matching.loss import hardest_negative_loss, hinge_rows
from matching.model import TSHSR, build_model
from matching.scoring import StoreImages
from matching.text import Vocabulary

COLLAPSE_SPREAD = 1e-4  # score std below this across a batch means every pair scores the same
COLLAPSE_STEPS = 20  # consecutive collapsed steps before the warning
CSV_FIELDS = ["epoch", "step", "lr", "train_loss", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5",
              "t2i_r10", "rsum", "best_rsum", "seconds"]


class RunError(ValueError):
    """A run directory cannot be used as asked (exists without --resume, nothing to resume)."""


@dataclass
class TrainResult:
    run_dir: Path
    best_rsum: float
    best_epoch: int
    epochs_done: int
    global_step: int
    losses: list[float] = field(default_factory=list)  # every step of this invocation, in order
    history: list[dict[str, Any]] = field(default_factory=list)  # the metrics rows of this invocation
    interrupted: bool = False


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


class _StopFlag:
    """SIGINT/SIGTERM ask the loop to stop after the current step and save a checkpoint."""

    def __init__(self) -> None:
        self.stop = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no signal handling
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.stop:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.stop = True

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def load_training_data(config: Config, features: Path, captions: Path, vocab: Vocabulary, train_split: str,
                       val_split: str | None) -> tuple[FeatureStore, Config, PairDataset, tuple | None]:
    """Open the data, fit the model config to it, and build the train set and the validation set."""
    store = FeatureStore(features)
    if store.feature_dim != config.model.img_dim or store.max_boxes != config.model.num_regions:
        # Region count and feature width are facts of the data, not choices.
        config = config.updated(model={"img_dim": store.feature_dim, "num_regions": store.max_boxes})
    config = config.updated(model={"vocab_size": len(vocab)})
    pairs = build_pairs(read_captions(captions, train_split), store.image_ids, vocab)
    dataset = PairDataset(store, pairs, in_memory=config.train.features_in_memory)
    validation = None
    if val_split:
        # Unsplit captions are training data; validation needs captions marked as the val split.
        val_captions = [c for c in read_captions(captions, val_split) if c.split is not None]
        if val_captions:
            image_ids, ordered = evaluation_set(val_captions, store.image_ids, config.train.captions_per_image)
            if config.train.val_images:
                image_ids = image_ids[: config.train.val_images]
                ordered = ordered[: len(image_ids) * config.train.captions_per_image]
            validation = (image_ids, [vocab.encode(c.text) for c in ordered])
    return store, config, dataset, validation


def validate(model: TSHSR, store: FeatureStore, validation: tuple, config: Config, device: torch.device,
             ctx: DistContext | None = None) -> dict:
    """Recall metrics on the validation images (all of them against all their captions).

    Under torchrun the images are shared among the ranks and every rank gets the metrics.
    """
    image_ids, tokens = validation
    sims = score_matrix_ranks(model, StoreImages(store, image_ids), tokens, ctx or DistContext(), device,
                              batch_size=max(config.train.batch_size, 32))
    return recall_metrics(sims, config.train.captions_per_image)


def train(
    config: Config,
    *,
    features: str | os.PathLike,
    captions: str | os.PathLike,
    vocab_path: str | os.PathLike,
    run_dir: str | os.PathLike,
    resume: bool = False,
    device: str = "cpu",
    train_split: str = "train",
    val_split: str | None = "val",
    max_steps: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train a model; returns where it is and how it did.

    Started by torchrun (``torchrun --nproc_per_node=N -m pipelines.cli train …``), the
    processes train together with DistributedDataParallel: `batch_size` is each
    process's share, the loss sees the global batch of N × batch_size, and only
    rank 0 writes files and logs.

    Args:
        config: the recipe and the model (img_dim, num_regions and vocab_size are
            taken from the data).
        features, captions, vocab_path: the data.
        run_dir: the run directory; must not hold a run unless `resume`.
        resume: continue the run in `run_dir` from its checkpoint_last.pt (its
            saved config wins over `config`).
        max_steps: stop (with a checkpoint, as if interrupted) after this many
            optimizer steps of this invocation.
    """
    ctx, device_t = setup(device)
    try:
        return _train(config, ctx=ctx, device=device_t, features=Path(features), captions=Path(captions),
                      vocab_path=Path(vocab_path), run_dir=Path(run_dir), resume=resume, train_split=train_split,
                      val_split=val_split, max_steps=max_steps, progress=progress and ctx.is_main,
                      log=log if ctx.is_main else (lambda line: None))
    finally:
        teardown(ctx)


def _train(config: Config, *, ctx: DistContext, device: torch.device, features: Path, captions: Path,
           vocab_path: Path, run_dir: Path, resume: bool, train_split: str, val_split: str | None,
           max_steps: int | None, progress: bool, log: Callable[[str], None]) -> TrainResult:
    last = run_dir / "checkpoint_last.pt"
    if resume:
        if not last.exists():
            raise RunError(f"{run_dir}: nothing to resume (no checkpoint_last.pt)")
        state = checkpoint.load_payload(last)
        config = Config.from_dict(state["config"])
    else:
        if last.exists():
            raise RunError(f"{run_dir}: a run already exists here; pass --resume to continue it "
                           "or choose another --name")
        state = None
        config.train.validate()
    vocab = Vocabulary.load(vocab_path)
    if state is not None and Vocabulary(state["vocab"]) != vocab:
        raise RunError(f"{vocab_path}: not the vocabulary {run_dir} was trained with")
    store, config, dataset, validation = load_training_data(config, features, captions, vocab,
                                                            train_split, val_split)
    if validation is None:
        log(f"note: no '{val_split}' captions: no validation; model_best.pt is the last epoch")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = config.train.allow_tf32
        torch.backends.cudnn.allow_tf32 = config.train.allow_tf32
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")
    if ctx.enabled:
        log(f"{ctx.world_size} processes × batch {config.train.batch_size} = global batch "
            f"{ctx.world_size * config.train.batch_size}")

    seed_everything(config.train.seed)
    model = build_model(config.model).to(device)
    ddp = None
    if ctx.enabled:
        from torch.nn.parallel import DistributedDataParallel

        convert_batchnorm(model)
        ddp = DistributedDataParallel(GlobalBatchScores(model),
                                      device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.train.learning_rate)
    epoch, batch_in_epoch, global_step = 0, 0, 0
    best_rsum, best_epoch, epoch_loss, epoch_steps = -1.0, -1, 0.0, 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        progress_state = state["progress"]
        epoch, batch_in_epoch = progress_state["epoch"], progress_state["batch_in_epoch"]
        global_step, best_rsum = progress_state["global_step"], progress_state["best_rsum"]
        best_epoch = progress_state["best_epoch"]
        epoch_loss, epoch_steps = progress_state["epoch_loss"], progress_state["epoch_steps"]
        saved = state["rng"]["ranks"]
        if len(saved) != ctx.world_size:
            log(f"note: the run was saved by {len(saved)} processes and resumes on {ctx.world_size}: "
                "the data order and dropout differ from an uninterrupted run from here on")
        _restore_rng(saved[ctx.rank % len(saved)])
        log(f"resuming {run_dir} at epoch {epoch + 1}, batch {batch_in_epoch}, step {global_step}")

    sampler = LengthBucketSampler([len(c) for c in dataset.pairs.captions],
                                  config.train.batch_size * ctx.world_size, seed=config.train.seed,
                                  num_replicas=ctx.world_size, rank=ctx.rank)
    # The loader draws a worker seed from its generator at every epoch start; a generator of
    # its own keeps that draw off the global RNG that dropout uses, so a resume mid-epoch
    # continues the very same dropout masks.
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_pairs,
                        num_workers=config.train.workers, pin_memory=device.type == "cuda",
                        persistent_workers=config.train.workers > 0,
                        generator=torch.Generator().manual_seed(config.train.seed))
    writer = _tensorboard(run_dir, global_step) if ctx.is_main else _NoWriter()
    result = TrainResult(run_dir, best_rsum, best_epoch, epoch, global_step)
    collapsed_steps = 0
    started = time.time()

    def save_last() -> None:  # a collective (RNG states of every rank); rank 0 writes
        states = rng_states(ctx, _rng_state())
        if ctx.is_main:
            checkpoint.save(last, model, config, vocab, optimizer=optimizer.state_dict(), rng={"ranks": states},
                            progress={"epoch": epoch, "batch_in_epoch": batch_in_epoch, "global_step": global_step,
                                      "best_rsum": best_rsum, "best_epoch": best_epoch, "epoch_loss": epoch_loss,
                                      "epoch_steps": epoch_steps, "world_size": ctx.world_size})

    with _StopFlag() as flag:
        while epoch < config.train.epochs:
            lr = learning_rate(config, epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            hardest = config.train.hardest_negatives and epoch >= config.train.warmup_epochs
            sampler.set_epoch(epoch, batch_in_epoch)
            model.train()
            bar = _bar(len(sampler), f"epoch {epoch + 1}/{config.train.epochs}", progress)
            tick, pairs_seen = time.time(), 0
            for batch in loader:
                loss, spread = train_step(model, optimizer, batch, config, device, hardest, ddp=ddp)
                global_step += 1
                batch_in_epoch += 1
                epoch_loss += loss
                epoch_steps += 1
                result.losses.append(loss)
                pairs_seen += len(batch.lengths) * ctx.world_size
                writer.add_scalar("train/loss", loss, global_step)
                collapsed_steps = collapsed_steps + 1 if spread < COLLAPSE_SPREAD else 0
                if collapsed_steps == COLLAPSE_STEPS:
                    batch_size = len(batch.lengths) * ctx.world_size
                    log(f"warning: training has collapsed: every pair gets the same score (spread {spread:.1e}) "
                        f"and the loss is stuck at 2·B·margin = {2 * batch_size * config.train.margin:.1f}. "
                        "Remedy: train the first epochs on the sum over all negatives (--warmup-epochs 2 or "
                        "more, until validation recall has climbed); on small datasets also raise --lr (e.g. 3e-3).")
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", pairs_s=f"{pairs_seen / max(time.time() - tick, 1e-9):.0f}")
                if config.train.log_every and global_step % config.train.log_every == 0 and not progress:
                    log(f"epoch {epoch + 1} step {global_step}: loss {loss:.4f}, lr {lr:.2e}")
                stop_now = agree(ctx, flag.stop or (max_steps is not None and len(result.losses) >= max_steps),
                                 device)
                if stop_now or (config.train.checkpoint_every and global_step % config.train.checkpoint_every == 0):
                    save_last()
                if stop_now:
                    bar.close()
                    writer.close()
                    log(f"stopped at epoch {epoch + 1}, step {global_step}; continue with --resume "
                        f"(checkpoint {last})")
                    result.interrupted = True
                    result.global_step, result.epochs_done = global_step, epoch
                    return result
            bar.close()
            row: dict[str, Any] = {"epoch": epoch + 1, "step": global_step, "lr": lr,
                                   "train_loss": epoch_loss / max(epoch_steps, 1)}
            improved = validation is None
            if validation is not None:
                metrics = validate(model, store, validation, config, device, ctx)
                row.update({k: metrics[k] for k in CSV_FIELDS if k in metrics})
                improved = metrics["rsum"] > best_rsum
                for key, value in metrics.items():
                    writer.add_scalar(f"val/{key}", value, global_step)
            if improved:
                best_rsum, best_epoch = float(row.get("rsum", 0.0)), epoch + 1
                if ctx.is_main:
                    checkpoint.save(run_dir / "model_best.pt", model, config, vocab,
                                    best={"epoch": best_epoch, "rsum": best_rsum})
            row.update({"best_rsum": best_rsum, "seconds": round(time.time() - started, 1)})
            if ctx.is_main:
                _append_csv(run_dir / "metrics.csv", row)
            result.history.append(row)
            log(_epoch_line(row, config.train.epochs, hardest, improved and validation is not None))
            epoch, batch_in_epoch, epoch_loss, epoch_steps = epoch + 1, 0, 0.0, 0
            save_last()
    writer.close()
    result.best_rsum, result.best_epoch = best_rsum, best_epoch
    result.epochs_done, result.global_step = epoch, global_step
    return result


def train_step(model: TSHSR, optimizer: torch.optim.Optimizer, batch: Batch, config: Config,
               device: torch.device, hardest: bool, *, ddp: torch.nn.Module | None = None) -> tuple[float, float]:
    """One optimizer step on a batch: (loss of the global batch, std of the scores computed here).

    With `ddp` (a DistributedDataParallel(GlobalBatchScores)), this rank holds a slice
    of the global batch: it scores its images against every caption and every image
    against its captions, so the hardest negatives are sought in the whole global batch;
    the per-rank losses sum to the single-process loss of that batch.
    """
    features = batch.features.to(device, non_blocking=True)
    num_boxes = batch.num_boxes.to(device, non_blocking=True)
    tokens, lengths = batch.tokens.to(device, non_blocking=True), batch.lengths.to(device, non_blocking=True)
    image_index = batch.image_index.to(device)
    amp = config.train.mixed_precision and device.type == "cuda"
    margin = config.train.margin
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
        if ddp is None:
            scores = model(features, num_boxes, tokens, lengths)  # (B, B)
            same_image = image_index[:, None] == image_index[None, :]
            loss = hardest_negative_loss(scores.float(), margin, hardest=hardest, same_image=same_image)
            total = loss.detach()
        else:
            rows, cols = ddp(features, num_boxes, tokens, lengths)  # (b, G), (G, b)
            everyone = gather_rows(image_index)  # (G,) the global batch's image of each caption
            offset = int(gather_rows(image_index.new_tensor([len(image_index)]))[: dist.get_rank()].sum())
            positive = offset + torch.arange(len(image_index), device=device)
            same_image = image_index[:, None] == everyone[None, :]  # (b, G)
            loss = (hinge_rows(rows.float(), positive, margin, hardest=hardest, not_negative=same_image)
                    + hinge_rows(cols.float().t(), positive, margin, hardest=hardest, not_negative=same_image))
            total = loss.detach().clone()
            dist.all_reduce(total)
            # DDP averages gradients over ranks; the global loss is the sum of the ranks' losses.
            loss = loss * dist.get_world_size()
            scores = rows
    loss.backward()
    if config.train.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)
    optimizer.step()
    value = float(total)
    if not math.isfinite(value):
        raise FloatingPointError(f"the loss became {value}; lower --lr or disable mixed precision")
    return value, float(scores.detach().float().std())


def _epoch_line(row: dict[str, Any], epochs: int, hardest: bool, improved: bool) -> str:
    line = f"epoch {row['epoch']}/{epochs}: loss {row['train_loss']:.4f} ({'hardest' if hardest else 'all'} " \
           f"negatives), lr {row['lr']:.1e}"
    if "rsum" in row:
        line += (f" | val i2t R@1 {row['i2t_r1']:.1f} R@5 {row['i2t_r5']:.1f} R@10 {row['i2t_r10']:.1f}, "
                 f"t2i R@1 {row['t2i_r1']:.1f} R@5 {row['t2i_r5']:.1f} R@10 {row['t2i_r10']:.1f}, "
                 f"rsum {row['rsum']:.1f}" + (" (best)" if improved else ""))
    return line + f" [{row['seconds']:.0f}s]"


def _append_csv(path: Path, row: dict[str, Any]) -> None:
    new = not path.exists()
    with open(path, "a", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


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


def _bar(total: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, disable=None if enabled else True,
                leave=False)  # None: no bar when stderr is not a terminal

