"""Using a trained model on a feature directory: retrieval evaluation (and, later, search)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from extract.shards import FeatureStore, ShardFormatError
from matching import checkpoint
from matching.captions import evaluation_set, read_captions
from matching.evaluation import evaluate_protocol, protocol_names
from matching.scoring import StoreImages, score_matrix
from matching.text import Vocabulary, VocabularyError


@dataclass
class EvaluationResult:
    results: dict[str, dict[str, Any]]  # protocol name → metrics
    sims: np.ndarray  # (n_images, n_images · cpi)
    image_ids: list[str]
    num_captions: int


def check_features(store: FeatureStore, img_dim: int, num_regions: int) -> None:
    """The feature directory must fit the model's input: a clear error otherwise."""
    if store.feature_dim != img_dim:
        raise ShardFormatError(f"{store.directory}: features are {store.feature_dim}-d, the model "
                               f"expects {img_dim}-d region features")
    if store.max_boxes > num_regions:
        raise ShardFormatError(f"{store.directory}: images have up to {store.max_boxes} boxes, the model "
                               f"was built for {num_regions}")


def check_vocab(vocab: Vocabulary, vocab_path: str | os.PathLike) -> None:
    """A vocabulary file given beside a checkpoint must be the checkpoint's own."""
    given = Vocabulary.load(vocab_path)
    if given != vocab:
        differ = next((i for i, (a, b) in enumerate(zip(given.words, vocab.words, strict=False)) if a != b),
                      min(len(given), len(vocab)))
        raise VocabularyError(f"{vocab_path}: does not match the checkpoint's vocabulary "
                              f"({len(given)} vs {len(vocab)} words, first difference at index {differ})")


def evaluate_checkpoint(
    checkpoint_path: str | os.PathLike,
    features: str | os.PathLike,
    captions: str | os.PathLike,
    *,
    split: str | None = "test",
    protocol: str = "all",
    captions_per_image: int = 5,
    vocab_path: str | os.PathLike | None = None,
    device: str = "cpu",
    batch_size: int = 128,
    memory_budget: int | None = None,
    progress: bool = False,
) -> EvaluationResult:
    """Score a split's images against its captions and compute the retrieval metrics."""
    model, config, vocab = checkpoint.load(checkpoint_path)
    if vocab_path is not None:
        check_vocab(vocab, vocab_path)
    store = FeatureStore(features)
    check_features(store, config.model.img_dim, config.model.num_regions)
    image_ids, ordered = evaluation_set(read_captions(captions, split), store.image_ids, captions_per_image)
    protocol_names(len(image_ids), protocol)  # fail before scoring
    tokens = [vocab.encode(c.text) for c in ordered]
    sims = score_matrix(model, StoreImages(store, image_ids), tokens, device=device,
                        batch_size=batch_size, memory_budget=memory_budget, progress=progress)
    return EvaluationResult(evaluate_protocol(sims, protocol, captions_per_image), sims, image_ids, len(ordered))
