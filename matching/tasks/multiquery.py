"""The ``multi-query`` task: several region queries given in rounds → one image (HMRN, `matching.model.hmrn`).

Multi-query JSONL files in (image_id, split, queries); in the one training loop of
`matching.training.loop` (run directory, resume, checkpoints, signals, logs, collapse
detection, DistributedDataParallel) it brings the data (query sets, `max_turns` queries drawn
per image in a fresh order each epoch), HMRN's loss and the per-round validation; evaluation
ranks every image of the split for every set after each round (R@1/5/10 and mean rank per
round; protocol ``full``), or does what HMRN's evaluation script does (protocol ``hmrn``: its
image subset, its rounded w_r, its i2t local matrix added as it comes out, its tie rule;
docs/multi-query.md, "Reproducing HMRN's table"); a search scores every image with the model's
own rounds, and a hit shows the regions its queries attend to in the reasoning.

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
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from extract.runtime import Launch
from extract.shards import FeatureStore
from matching.config import PRESETS, Config, EvaluationSettings, MultiQueryConfig
from matching.data.queries import (
    MultiQueryDataset,
    QuerySetBatch,
    QuerySetBatchSampler,
    build_query_data,
    collate_query_sets,
    is_query_file,
    read_query_sets,
    read_query_split,
    set_images,
)
from matching.data.text import Vocabulary
from matching.model.encoders import Embedded
from matching.model.hmrn import HMRN, MultiQuerySimilarities, build_hmrn, multiquery_loss_part, score_rounds
from matching.retrieval.metrics import HMRN_PROTOCOL, MetricsError, format_round_table, round_chance, round_metrics
from matching.retrieval.scoring import StoreImages
from matching.tasks.base import COLLAPSE_STEPS, EvaluationData, Ranking, StepResult, TrainingData
from matching.training.distributed import gather_embedded, gather_rows, images_split_among_ranks

HMRN_TILE = 700  # HMRN's evaluation script scores tiles of 700 query sets × 700 images (its shared_size)


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
    """Several region queries → one image (see the module docstring)."""

    name = "multi-query"
    model_config = MultiQueryConfig
    recipe = PRESETS["hmrn"]  # HMRN's recipe (its opts.py)
    variants: dict[str, dict[str, Any]] = {}
    # A checkpoint saved before `model.query_wrap` existed was trained on queries wrapped as captions are.
    legacy_fields: dict[str, Any] = {"model.query_wrap": "start-end"}
    run_prefix = "hmrn"
    data_file = "a multi-query JSONL file (image_id, split, queries)"
    unit = "query sets"
    combination = "rounds"  # the model's own score after each round
    metric_fields = ("first_r1", "last_r1", "last_r5", "last_r10", "last_meanr", "rsum")

    # ------------------------------------------------------------------ data and network

    def reads(self, path: str | os.PathLike) -> bool:
        return is_query_file(path)

    def vocabulary_texts(self, path: str | os.PathLike, splits: Sequence[str] | None) -> list[str]:
        """The queries of `splits` (default train)."""
        return [q for item in read_query_split(path, list(splits or ("train",)), "the vocabulary")
                for q in item.queries]

    def text_wrap(self, config: Config) -> str:
        return config.model.query_wrap  # HMRN's: words… <end>

    def gallery(self, path: str | os.PathLike, split: str | None) -> tuple[set[str], list[Any]]:
        sets = read_query_split(path, split, "search") if split else read_query_sets(path)
        return {item.image_id for item in sets}, []

    def build_model(self, config: MultiQueryConfig) -> HMRN:
        return build_hmrn(config)

    def has_first_stage(self, config: Config) -> bool:
        return False  # HMRN scores every image; its rounds are its own

    # ------------------------------------------------------------------ training

    def load_data(self, config: Config, features: Path, data_file: Path, vocab: Vocabulary, train_split: str,
                  val_split: str | None, log: Callable[[str], None]) -> tuple[Config, TrainingData]:
        """Query sets of the train split (each image's `max_turns` queries redrawn every epoch) and of
        the validation split (the first `max_turns` queries in file order)."""
        store = FeatureStore(features)
        config = config.updated(model={"img_dim": store.feature_dim, "num_regions": store.max_boxes,
                                       "vocab_size": len(vocab)})
        turns = config.model.max_turns
        wrap = self.text_wrap(config)
        sets = build_query_data(read_query_split(data_file, train_split, "training"), store.image_ids, vocab, turns,
                                wrap)
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
            val = build_query_data(marked, store.image_ids, vocab, turns, wrap)
            if config.train.val_images:
                val.image_ids, val.queries = val.image_ids[: config.train.val_images], val.queries[
                    : config.train.val_images]
            validation = (val.image_ids, [queries[:turns] for queries in val.queries])
        return config, TrainingData(store, dataset, validation)

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


    # ------------------------------------------------------------------ evaluation

    def evaluation_data(self, path: str | os.PathLike, split: str | None, store: FeatureStore,
                        settings: EvaluationSettings, configs: Sequence[Config],
                        sims_files: Sequence[str | os.PathLike]) -> EvaluationData:
        """The split's images with their query sets' first T queries (T: the models' `max_turns`, or the
        rounds of the saved score tensors): every one (protocol full), or HMRN's (`hmrn_subset`)."""
        protocol = round_protocol(settings.protocol)
        sets = read_query_split(path, split, "evaluation") if split else read_query_sets(path)
        left_out = 0
        if protocol == HMRN_PROTOCOL:
            from extract.runtime import Launch

            if Launch.from_env().world_size > 1:
                raise MetricsError("--protocol hmrn scores HMRN's tiles in one process; start evaluate without "
                                   "torchrun")
            kept = hmrn_subset(sets)
            left_out = len(sets) - len(kept)
            sets = kept
        turns = min((config.model.max_turns for config in configs), default=0) or _rounds_of(sims_files[0])
        image_ids = set_images(sets, store.image_ids, turns)
        return EvaluationData(image_ids, [list(item.queries[:turns]) for item in sets],
                              (turns, len(image_ids), len(image_ids)), len(sets), left_out)

    def encode(self, data: EvaluationData, vocab: Vocabulary, config: Config) -> list[list[list[int]]]:
        wrap = self.text_wrap(config)
        return [[vocab.encode(q, wrap) for q in queries] for queries in data.texts]

    def score(self, model: HMRN, images: Any, tokens: list[list[list[int]]], data: EvaluationData,
              settings: EvaluationSettings, launch: Launch, device: torch.device, *, progress: bool,
              log: Callable[[str], None] | None) -> np.ndarray:
        """The round scores (R, Q, N); under HMRN's protocol as its script computes them: w_r rounded to two
        decimals, an i2t model's local part added transposed in its 700 × 700 tiles (`score_rounds`)."""
        rounds = data.shape[0]
        script = round_protocol(settings.protocol) == HMRN_PROTOCOL
        return images_split_among_ranks(
            lambda share: score_rounds(model, share, tokens, rounds=rounds, device=device,
                                       batch_size=settings.batch_size, memory_budget=settings.memory_budget_bytes,
                                       round_weight="rounded" if script else None,
                                       script_tiles=HMRN_TILE if script else 0),
            images, launch, device, image_axis=2)

    def metrics(self, scores: np.ndarray, data: EvaluationData, settings: EvaluationSettings) -> dict[str, Any]:
        """{"protocol", "rounds": [...]}, and for HMRN's protocol the sets it left out and its w_r."""
        protocol = round_protocol(settings.protocol)
        if protocol == HMRN_PROTOCOL:
            return {"protocol": protocol, "left_out": data.left_out, "round_weight": "rounded",
                    **round_metrics(scores, ties="argsort")}
        return {"protocol": protocol, **round_metrics(scores)}

    def two_stage(self, models: Sequence[HMRN], configs: Sequence[Config], sources: Sequence[Any], images: Any,
                  tokens: Sequence[list[Any]], data: EvaluationData, settings: EvaluationSettings,
                  device: torch.device, *, progress: bool,
                  log: Callable[[str], None] | None) -> tuple[dict[str, Any], dict[str, Any]]:
        raise MetricsError("--shortlist re-ranks a matching model's first-stage shortlist; a multi-query model "
                           "scores every image")

    def table(self, results: dict[str, Any], reports: dict[str, Any] | None, n_images: int) -> str:
        """The per-round table under a line that says which protocol made it."""
        if results.get("protocol") == HMRN_PROTOCOL:
            total = n_images + int(results.get("left_out", 0))
            title = (f"protocol hmrn (HMRN's evaluation script): the first {n_images} of {total} query sets and "
                     "images in image-id order, w_r rounded to 2 decimals, an i2t model's local level added as the "
                     "script adds it, ties where np.argsort leaves them")
        else:
            title = (f"protocol full (ours): all {n_images} images ranked for every query set, w_r as each "
                     "model's config says, ties count against the query")
        return title + "\n" + format_round_table(results, round_chance(n_images))

    # ------------------------------------------------------------------ search

    def ranker(self, model: HMRN, gallery: Any, device: torch.device, shortlist: int,
               batch_size: int) -> RoundsRanker:
        return RoundsRanker(model, gallery, device, batch_size)

    def regions(self, model: HMRN, images: Embedded, queries: list[list[int]], ranking: Ranking) -> np.ndarray:
        """The reasoning's query → region attention, averaged over the queries: (n, K), padded regions 0."""
        from matching.data.queries import pad_query_sets
        from matching.model.similarity import clipped_cosines, region_attention

        device = images.local.device
        with torch.inference_mode():
            tokens, lengths = pad_query_sets([queries])
            encoded = model.encode_queries(tokens.to(device), lengths.to(device))  # (1, T, d)
            cosines = clipped_cosines(images.local, encoded.local)  # (n, 1, K, T)
            alpha = region_attention(cosines, images.mask, encoded.mask, model.reasoning.lam)  # (n, 1, T, K)
            return alpha[:, 0].mean(1).float().cpu().numpy()  # (n, K)

    def caption_scores(self, model: HMRN, image: Embedded, tokens: list[list[int]],
                       cache: dict[str, Any]) -> np.ndarray:
        from matching.retrieval.search import QueryError

        raise QueryError("a multi-query model ranks images for queries, not captions for an image")


class RoundsRanker:
    """HMRN's search: every gallery image scored for the queries after each round (`score_rounds`), a block of the
    encoded gallery at a time."""

    name = "rounds"
    shortlist = 0
    block = 4096  # images read from the encoded gallery at once

    def __init__(self, model: HMRN, gallery: Any, device: torch.device, batch_size: int = 128) -> None:
        self.model, self.gallery, self.device, self.batch_size = model, gallery, device, batch_size

    def rank(self, queries: list[list[int]], k: int) -> Ranking:
        scores = np.zeros((len(self.gallery), len(queries)), np.float32)
        for start, images in self.gallery.blocks(self.block, self.device):
            scores[start:start + len(images)] = score_rounds(self.model, images, [queries], rounds=len(queries),
                                                             device=self.device, batch_size=self.batch_size)[:, 0].T
        return Ranking(np.arange(len(self.gallery)), scores)


def round_protocol(protocol: str) -> str:
    """The multi-query protocol a request names: ``full`` (ours: every set and image of the split; also what
    ``all`` gives) or ``hmrn`` (HMRN's script); MetricsError for a matching protocol."""
    if protocol in ("all", "full"):
        return "full"
    if protocol == HMRN_PROTOCOL:
        return protocol
    raise MetricsError(f"protocol {protocol!r} is a matching protocol; a multi-query evaluation takes full "
                       f"(every image of the split) or {HMRN_PROTOCOL} (HMRN's evaluation script)")


def hmrn_subset(sets: Sequence[Any]) -> list[Any]:
    """The query sets HMRN's evaluation script ranks: its test loader orders the images by (integer) image id,
    and it scores whole tiles of `HMRN_TILE` sets × `HMRN_TILE` images only, so the first ⌊N / 700⌋ · 700
    (9,800 of the 9,896 test images). Ids that are not all integers keep the file's order.

    MetricsError when the split has fewer sets than one tile.
    """
    ordered = list(sets)
    if all(str(item.image_id).isdigit() for item in ordered):
        ordered.sort(key=lambda item: int(item.image_id))
    kept = len(ordered) // HMRN_TILE * HMRN_TILE
    if not kept:
        raise MetricsError(f"protocol {HMRN_PROTOCOL} ranks whole tiles of {HMRN_TILE} query sets and images, as "
                           f"HMRN's script does; the split has {len(ordered)}: use --protocol full")
    return ordered[:kept]


def _rounds_of(path: str | os.PathLike) -> int:
    """The rounds of a saved multi-query score tensor (rounds × sets × images)."""
    try:
        shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
    except (OSError, ValueError) as error:
        raise MetricsError(f"{path}: not a readable .npy score matrix ({str(error).splitlines()[0][:200]})") from None
    if len(shape) != 3:
        raise MetricsError(f"{path}: a multi-query score tensor is (rounds × query sets × images), not {shape}")
    return int(shape[0])


def _loss_weights(config: Config) -> dict[str, float]:
    model = config.model
    return {"tau": model.tau, "local_weight": model.local_weight, "reasoning_weight": model.reasoning_weight}
