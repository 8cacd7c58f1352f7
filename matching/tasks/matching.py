"""The ``matching`` task: one caption ↔ one image (TSHSR, HSR, SGR; `matching.model.tshsr`).

Caption files in (Karpathy JSON, TSV, JSONL); caption/image pairs trained with the paper's
hinge loss over the hardest negatives (Eq. 9) and, beside the model, the first-stage head's own
loss (`matching.model.first_stage`); evaluated by R@1/5/10, medr, meanr and rsum under the
standard protocols (every pair scored, or two-stage with a shortlist); searched by the exact
score of every image or of a first-stage shortlist, several queries combined by the mean of
their scores; a hit shows the regions its words attend to (Eq. 2's α).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from extract.runtime import Launch
from extract.shards import FeatureStore
from matching.config import VARIANTS, Config, EvaluationSettings, ModelConfig
from matching.data.captions import evaluation_set, read_captions, read_split
from matching.data.pairs import Batch, EpochBatchSampler, PairDataset, build_pairs, collate_pairs
from matching.data.queries import is_query_file
from matching.data.text import Vocabulary
from matching.model.encoders import Embedded
from matching.model.first_stage import first_stage_loss, info_nce_rows
from matching.model.tshsr import TSHSR, build_model
from matching.retrieval.metrics import evaluate_protocol, format_table, protocol_names, recall_metrics
from matching.retrieval.scoring import StoreImages, encode_captions, score_matrix
from matching.tasks.base import COLLAPSE_STEPS, EvaluationData, Ranking, StepResult, TrainingData
from matching.training.distributed import GlobalBatchScores, gather_rows, score_matrix_ranks
from matching.training.loss import hardest_negative_loss, hinge_rows
from matching.training.rundir import RECALL_FIELDS

CAPTION_CACHE_BYTES = 2 << 30  # a search engine keeps its encoded caption gallery in memory up to this size


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
    """One caption ↔ one image (see the module docstring)."""

    name = "matching"
    model_config = ModelConfig
    recipe: dict[str, Any] = {}  # the paper's (TrainConfig's defaults)
    variants = VARIANTS
    # Checkpoints from before these fields: trained without the global loss, no first-stage head.
    legacy_fields = {"train.global_loss_weight": 0.0, "model.first_stage_dim": 0,
                     "model.first_stage_pooling": "attention"}
    run_prefix = "tshsr"
    data_file = "a caption file (Karpathy JSON, TSV or JSONL)"
    unit = "captions"
    combination = "mean"  # several queries: the mean of their scores
    metric_fields = ("first_stage_loss", *RECALL_FIELDS, "rsum")

    # ------------------------------------------------------------------ data and network

    def reads(self, path: str | os.PathLike) -> bool:
        return not is_query_file(path)

    def vocabulary_texts(self, path: str | os.PathLike, splits: Sequence[str] | None) -> list[str]:
        """The captions of `splits` (default train and val)."""
        return [c.text for c in read_split(path, list(splits or ("train", "val")), "the vocabulary")]

    def text_wrap(self, config: Config) -> str:
        return "start-end"  # SGRAF's captions: <start> words… <end>

    def gallery(self, path: str | os.PathLike, split: str | None) -> tuple[set[str], list[Any]]:
        selected = read_split(path, split, "search") if split else read_captions(path)
        return {c.image_id for c in selected}, selected

    def build_model(self, config: ModelConfig) -> TSHSR:
        return build_model(config)

    def has_first_stage(self, config: Config) -> bool:
        from matching.retrieval.shortlist import has_first_stage

        return has_first_stage(config)

    # ------------------------------------------------------------------ training

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
        """Recall metrics on the validation images (all of them against all their captions); under torchrun
        the images are shared among the ranks and every rank gets the metrics."""
        image_ids, tokens = data.validation
        sims = score_matrix_ranks(model, StoreImages(data.store, image_ids), tokens, launch, device,
                                  batch_size=max(config.train.batch_size, 32))
        return recall_metrics(sims, config.train.captions_per_image)

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

    # ------------------------------------------------------------------ evaluation

    def evaluation_data(self, path: str | os.PathLike, split: str | None, store: FeatureStore,
                        settings: EvaluationSettings, configs: Sequence[Config],
                        sims_files: Sequence[str | os.PathLike]) -> EvaluationData:
        """The split's images and their first `captions_per_image` captions (caption k of image i at i·cpi + k)."""
        selected = read_split(path, split, "evaluation") if split else read_captions(path)
        image_ids, ordered = evaluation_set(selected, store.image_ids, settings.captions_per_image)
        protocol_names(len(image_ids), settings.protocol)  # fail before scoring
        return EvaluationData(image_ids, [c.text for c in ordered], (len(image_ids), len(ordered)), len(ordered))

    def encode(self, data: EvaluationData, vocab: Vocabulary, config: Config) -> list[list[int]]:
        return [vocab.encode(text, self.text_wrap(config)) for text in data.texts]

    def score(self, model: TSHSR, images: Any, tokens: list[list[int]], data: EvaluationData,
              settings: EvaluationSettings, launch: Launch, device: torch.device, *, progress: bool,
              log: Callable[[str], None] | None) -> np.ndarray:
        return score_matrix_ranks(model, images, tokens, launch, device, batch_size=settings.batch_size,
                                  memory_budget=settings.memory_budget_bytes, progress=progress and launch.is_main,
                                  log=log if launch.is_main else None)

    def metrics(self, scores: np.ndarray, data: EvaluationData, settings: EvaluationSettings) -> dict[str, Any]:
        return evaluate_protocol(scores, settings.protocol, settings.captions_per_image)

    def two_stage(self, models: Sequence[TSHSR], configs: Sequence[Config], sources: Sequence[Any], images: Any,
                  tokens: Sequence[list[list[int]]], data: EvaluationData, settings: EvaluationSettings,
                  device: torch.device, *, progress: bool,
                  log: Callable[[str], None] | None) -> tuple[dict[str, Any], dict[str, Any]]:
        from matching.retrieval.shortlist import require_first_stage, two_stage_metrics

        for config, source in zip(configs, sources, strict=True):
            require_first_stage(config, source)

        results, reports = two_stage_metrics(
            list(models), images, list(tokens), k=int(settings.shortlist or 0), protocol=settings.protocol,
            captions_per_image=settings.captions_per_image, kind=settings.shortlist_index, device=device,
            batch_size=settings.batch_size, progress=progress, log=log)
        for name, report in reports.items():
            results[name]["shortlist"] = dataclasses.asdict(report)
        return results, reports

    def table(self, results: dict[str, Any], reports: dict[str, Any] | None, n_images: int) -> str:
        lines = [format_table(results)]
        for name, report in (reports or {}).items():
            lines.append(f"{name}: {report.line()}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ search

    def ranker(self, model: TSHSR, gallery: Any, device: torch.device, shortlist: int,
               batch_size: int) -> ExactRanker | ShortlistRanker:
        if shortlist:
            return ShortlistRanker(model, gallery, device, batch_size, shortlist)
        return ExactRanker(model, gallery, device, batch_size)

    def regions(self, model: TSHSR, images: Embedded, queries: list[list[int]], ranking: Ranking) -> np.ndarray:
        """Eq. 2's α of the latest query's words over each image's regions, averaged over the words: (n, K),
        padded regions 0. The query as the ranker encoded it when it kept it."""
        from matching.model.similarity import clipped_cosines, region_attention

        device = images.local.device
        with torch.inference_mode():
            if ranking.queries is not None:
                caption = ranking.queries.caption(len(queries) - 1)  # (1, L, d)
            else:
                tokens = queries[-1]
                caption = model.encode_captions(torch.tensor([tokens], device=device), torch.tensor([len(tokens)]))
            cos = clipped_cosines(images.local, caption.local, model.head.attention_clip)  # (n, 1, K, L)
            alpha = region_attention(cos, images.mask, caption.mask, model.head.lambda_i2t)  # (n, 1, L, K)
            return alpha[:, 0].mean(1).float().cpu().numpy()  # (n, K)

    def caption_scores(self, model: TSHSR, image: Embedded, tokens: list[list[int]],
                       cache: dict[str, Any]) -> np.ndarray:
        """One encoded image against every caption; the encoded captions are kept in `cache` when they fit
        `CAPTION_CACHE_BYTES` (encoded again for each call otherwise)."""
        if not tokens:
            from matching.retrieval.search import QueryError

            raise QueryError("no caption gallery: give --captions to rank captions for an image")
        device = image.local.device
        with torch.inference_mode():
            blocks = cache.get("captions")
            if blocks is None:
                blocks = encode_captions(model, tokens, device)
                if _caption_bytes(tokens, image.local.shape[-1]) <= CAPTION_CACHE_BYTES:
                    cache["captions"] = blocks
            scores = np.zeros(len(tokens), np.float32)
            for index, block in blocks:
                scores[index.numpy()] = model.pair_scores(image, block)[0].float().cpu().numpy()
        return scores


def _caption_bytes(tokens: list[list[int]], embed_size: int, batch_size: int = 128) -> int:
    """Memory of an encoded caption gallery: blocks padded to their longest caption, float32."""
    lengths = sorted(len(t) for t in tokens)
    padded = sum(len(lengths[i:i + batch_size]) * lengths[i:i + batch_size][-1]
                 for i in range(0, len(lengths), batch_size))
    return 4 * embed_size * (padded + len(lengths))


def _hardest(config: Config, epoch: int) -> bool:
    """Hardest negatives after the warm-up epochs (which sum the hinge over all negatives)."""
    return config.train.hardest_negatives and epoch >= config.train.warmup_epochs


# --------------------------------------------------------------------------- search rankers


def _rounds(scores: np.ndarray) -> np.ndarray:
    """(c, q) one score per query → (c, q) after each round: the mean of queries 1…r (float32; one query
    keeps its score exactly)."""
    if scores.shape[1] == 1:
        return scores
    return (np.cumsum(scores.astype(np.float64), axis=1) / np.arange(1, scores.shape[1] + 1)).astype(np.float32)


class ExactRanker:
    """Every gallery image scored by the full model, a block of the (encoded) gallery at a time."""

    name = "exact"
    shortlist = 0
    block = 4096  # images read from the encoded gallery at once

    def __init__(self, model: TSHSR, gallery: Any, device: torch.device, batch_size: int = 128,
                 precision: str = "float32") -> None:
        self.model, self.gallery, self.device, self.batch_size = model, gallery, device, batch_size
        self.precision = precision

    def rank(self, queries: list[list[int]], k: int) -> Ranking:
        from matching.retrieval.shortlist import encode_queries

        encoded = encode_queries(self.model, queries, self.device, self.batch_size)
        scores = np.zeros((len(self.gallery), len(queries)), np.float32)
        for start, images in self.gallery.blocks(self.block, self.device):
            scores[start:start + len(images)] = score_matrix(self.model, images, encoded, device=self.device,
                                                             batch_size=self.batch_size, precision=self.precision)
        return Ranking(np.arange(len(self.gallery)), _rounds(scores), encoded)


class ShortlistRanker:
    """Two-stage: the `shortlist` images nearest by first-stage cosine to each query and to their mean (the
    gallery's index), read from the encoded gallery and scored by the full model, the queries encoded once."""

    name = "shortlist"

    def __init__(self, model: TSHSR, gallery: Any, device: torch.device, batch_size: int = 128,
                 shortlist: int = 200, precision: str = "float32") -> None:
        self.model, self.gallery, self.device, self.batch_size = model, gallery, device, batch_size
        self.shortlist, self.precision = shortlist, precision

    def rank(self, queries: list[list[int]], k: int) -> Ranking:
        from matching.retrieval.shortlist import encode_queries, global_vectors

        encoded = encode_queries(self.model, queries, self.device, self.batch_size)
        vectors = global_vectors(encoded.vectors)  # (q, e)
        # each query's nearest images, and those nearest on average (the mean cosine is the cosine with the mean)
        searched = np.concatenate([vectors, vectors.mean(0, keepdims=True)]) if len(queries) > 1 else vectors
        _, nearest = self.gallery.nearest(searched, min(max(self.shortlist, k), len(self.gallery)))
        positions = np.unique(nearest[nearest >= 0])
        images = self.gallery.select(positions, self.device)
        scores = score_matrix(self.model, images, encoded, device=self.device, batch_size=self.batch_size,
                              precision=self.precision)  # (c, q)
        return Ranking(positions, _rounds(scores), encoded)
