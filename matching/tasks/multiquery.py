"""Training HMRN in the one training loop of `matching.training.loop` (the ``multi-query`` task).

The loop brings the run directory, resume, checkpoints, signals, logs, collapse detection and
DistributedDataParallel; this module brings the data (query sets, `max_turns` queries drawn per
image in a fresh order each epoch), HMRN's loss and the per-round validation.

Under torchrun each process scores its images against every process's query sets (rows) and
every image against its own sets (columns): its rows hold the image-to-sets InfoNCE terms of its
images and its columns the set-to-images terms of its sets, so the processes' losses sum to the
loss of the global batch, as for the matching model's hinge loss.

Validation ranks all validation images for every set at each round, with the model's own round
weights (what `evaluate` reports); the best epoch is the one with the largest last-round
R@1 + R@5 + R@10 (HMRN's selection; HMRN's script validates with w_r = 1, we validate what
the model is evaluated with).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from extract.runtime import Launch
from extract.shards import FeatureStore
from matching.config import Config
from matching.data.queries import (
    MultiQueryDataset,
    QuerySetBatch,
    QuerySetBatchSampler,
    build_query_data,
    collate_query_sets,
    read_query_sets,
    read_query_split,
)
from matching.data.text import Vocabulary
from matching.model.hmrn import HMRN, MultiQuerySimilarities, build_hmrn, multiquery_loss_part, score_rounds
from matching.retrieval.metrics import round_metrics
from matching.retrieval.scoring import StoreImages
from matching.tasks.base import COLLAPSE_STEPS, StepResult, TrainingData
from matching.training.distributed import gather_embedded, gather_rows, images_split_among_ranks


class GlobalBatchSimilarities(nn.Module):
    """The module DDP wraps: this rank's images against all query sets, and all images against its sets."""

    def __init__(self, model: HMRN) -> None:
        super().__init__()
        self.model = model

    def forward(self, features: Tensor, num_boxes: Tensor, tokens: Tensor,
                lengths: Tensor) -> tuple[MultiQuerySimilarities, MultiQuerySimilarities]:
        """→ (rows: local images × global sets, cols: global images × local sets)."""
        images = self.model.encode_images(features, num_boxes)
        queries = self.model.encode_queries(tokens, lengths)
        all_images, all_queries = gather_embedded(images), gather_embedded(queries)
        return self.model.similarities(images, all_queries), self.model.similarities(all_images, queries)


class MultiQueryTask:
    """Several region queries → one image (HMRN)."""

    name = "multi-query"
    metric_fields = ("first_r1", "last_r1", "last_r5", "last_r10", "last_meanr", "rsum")

    def load_data(self, config: Config, features: Path, data_file: Path, vocab: Vocabulary, train_split: str,
                  val_split: str | None, log: Callable[[str], None]) -> tuple[Config, TrainingData]:
        """Query sets of the train split (each image's `max_turns` queries redrawn every epoch) and of
        the validation split (the first `max_turns` queries in file order)."""
        store = FeatureStore(features)
        config = config.updated(model={"img_dim": store.feature_dim, "num_regions": store.max_boxes,
                                       "vocab_size": len(vocab)})
        turns = config.model.max_turns
        sets = build_query_data(read_query_split(data_file, train_split, "training"), store.image_ids, vocab, turns)
        dataset = MultiQueryDataset(store, sets, turns, seed=config.train.seed,
                                    in_memory=config.train.features_in_memory)
        validation = None
        marked = [s for s in read_query_sets(data_file, val_split) if s.split is not None] if val_split else []
        if not val_split:
            log("note: no validation split (--val-split ''): model_best.pt is the last epoch")
        elif not marked:
            log(f"note: {data_file} has no query sets marked '{val_split}': no validation; "
                "model_best.pt is the last epoch")
        else:
            val = build_query_data(marked, store.image_ids, vocab, turns)
            if config.train.val_images:
                val.image_ids, val.queries = val.image_ids[: config.train.val_images], val.queries[
                    : config.train.val_images]
            validation = (val.image_ids, [queries[:turns] for queries in val.queries])
        return config, TrainingData(store, dataset, validation)

    def build_model(self, config: Config) -> HMRN:
        return build_hmrn(config.model)

    def batches(self, data: TrainingData, config: Config, launch: Launch) -> tuple[QuerySetBatchSampler, Callable]:
        sampler = QuerySetBatchSampler(len(data.dataset), config.train.batch_size * launch.world_size,
                                       seed=config.train.seed, num_replicas=launch.world_size, rank=launch.rank)
        return sampler, collate_query_sets

    def distributed_module(self, model: HMRN) -> nn.Module:
        return GlobalBatchSimilarities(model)

    def step(self, model: HMRN, optimizer: torch.optim.Optimizer, batch: QuerySetBatch, config: Config,
             device: torch.device, epoch: int, ddp: nn.Module | None) -> StepResult:
        """One optimizer step of HMRN's loss: (the global batch's loss, the spread of its last-round scores)."""
        batch = batch.to(device)
        amp = config.train.mixed_precision and device.type == "cuda"
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            if ddp is None:
                sims = model(batch.features, batch.num_boxes, batch.tokens, batch.lengths)
                loss = multiquery_loss_part(sims, sims, 0, len(batch.num_boxes), **_loss_weights(config))
                total = loss.detach()
                spread = sims.local[:, :, -1]
            else:
                rows, cols = ddp(batch.features, batch.num_boxes, batch.tokens, batch.lengths)
                sizes = gather_rows(batch.num_boxes.new_tensor([len(batch.num_boxes)]))  # (world,)
                offset = int(sizes[: dist.get_rank()].sum())
                loss = multiquery_loss_part(rows, cols, offset, int(sizes.sum()), **_loss_weights(config))
                total = loss.detach().clone()
                dist.all_reduce(total)
                loss = loss * dist.get_world_size()  # DDP averages gradients; the global loss is the sum
                spread = rows.local[:, :, -1]
        loss.backward()
        if config.train.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)
        optimizer.step()
        value = float(total)
        if not math.isfinite(value):
            raise FloatingPointError(f"the loss became {value}; lower --lr or disable mixed precision")
        return StepResult(value, float(spread.detach().float().std()))

    def validate(self, model: HMRN, data: TrainingData, config: Config, device: torch.device,
                 launch: Launch) -> dict[str, float]:
        """Per-round metrics on the validation sets; under torchrun the images are shared among the ranks."""
        image_ids, query_sets = data.validation
        turns = config.model.max_turns
        scores = images_split_among_ranks(  # (R, Q, N)
            lambda share: score_rounds(model, share, query_sets, rounds=turns, device=device),
            StoreImages(data.store, image_ids), launch, device, image_axis=2)
        rounds = round_metrics(scores)["rounds"]
        first, last = rounds[0], rounds[-1]
        return {"first_r1": first["r1"], "last_r1": last["r1"], "last_r5": last["r5"], "last_r10": last["r10"],
                "last_meanr": last["meanr"], "rsum": last["r1"] + last["r5"] + last["r10"]}

    def summary(self, row: dict[str, Any], config: Config) -> str:
        line = "InfoNCE"
        if "rsum" in row:
            rounds = config.model.max_turns
            line += (f" | val round {rounds}: R@1 {row['last_r1']:.1f} R@5 {row['last_r5']:.1f} "
                     f"R@10 {row['last_r10']:.1f} mean rank {row['last_meanr']:.1f} (round 1: R@1 "
                     f"{row['first_r1']:.1f}), rsum {row['rsum']:.1f}")
        return line

    def collapse_hint(self, spread: float, loss: float, batch_size: int, config: Config, epoch: int) -> str:
        """Why the scores stopped spreading: HMRN's InfoNCE is 2·ln B when every image scores the same."""
        collapsed = 2 * math.log(batch_size)
        where = ("sits at" if abs(loss - collapsed) <= 0.02 * collapsed else "is") + f" {loss:.3f}"
        return (f"warning: training has collapsed: every image has scored the same against every query set for "
                f"{COLLAPSE_STEPS} steps (spread {spread:.1e}, batch of {batch_size}); the loss {where} (2·ln B = "
                f"{collapsed:.3f} once every score is equal). Remedy: lower --lr (now "
                f"{config.train.learning_rate:g}), or check that the queries describe their images (tshsr-pipe "
                "search on a few training sets).")


def _loss_weights(config: Config) -> dict[str, float]:
    model = config.model
    return {"tau": model.tau, "local_weight": model.local_weight, "reasoning_weight": model.reasoning_weight}
