"""Using a trained model on a feature directory: retrieval evaluation and search."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from extract.shards import FeatureStore, ShardFormatError
from matching import checkpoint
from matching.captions import evaluation_set, read_captions
from matching.encoders import Embedded
from matching.evaluation import evaluate_protocol, protocol_names
from matching.model import TSHSR
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
    """Score a split's images against its captions and compute the retrieval metrics.

    Under torchrun the images are shared among the ranks (each scores its slice of
    the matrix's rows) and every rank gets the same result.
    """
    from matching.distributed import score_matrix_ranks, setup, teardown

    model, config, vocab = checkpoint.load(checkpoint_path)
    if vocab_path is not None:
        check_vocab(vocab, vocab_path)
    store = FeatureStore(features)
    check_features(store, config.model.img_dim, config.model.num_regions)
    image_ids, ordered = evaluation_set(read_captions(captions, split), store.image_ids, captions_per_image)
    protocol_names(len(image_ids), protocol)  # fail before scoring
    tokens = [vocab.encode(c.text) for c in ordered]
    ctx, device_t = setup(device)
    try:
        sims = score_matrix_ranks(model, StoreImages(store, image_ids), tokens, ctx, device_t,
                                  batch_size=batch_size, memory_budget=memory_budget,
                                  progress=progress and ctx.is_main)
    finally:
        teardown(ctx)
    return EvaluationResult(evaluate_protocol(sims, protocol, captions_per_image), sims, image_ids, len(ordered))


class QueryError(ValueError):
    """A search query that cannot be answered (no known word, an unknown image id)."""


@dataclass
class Hit:
    """One search result: an image (text → image) or a caption (image → text)."""

    rank: int  # 1-based
    score: float
    item: str  # image id, or caption text
    image_id: str  # the image shown: the hit itself, or the query image
    matches_query_image: bool = False  # image → text: the caption belongs to the query image
    regions: list[tuple[list[float], float]] | None = None  # (box x1 y1 x2 y2, attention weight), strongest first


def encode_query(vocab: Vocabulary, text: str) -> list[int]:
    tokens = vocab.encode(text)
    if all(t == 3 for t in tokens[1:-1]):
        raise QueryError(f"none of the words of {text!r} is in the model's vocabulary of {len(vocab)} words")
    return tokens


def attended_regions(model: TSHSR, store: FeatureStore, image_id: str, tokens: list[int],
                     top: int = 3) -> list[tuple[list[float], float]]:
    """The regions the caption's words attend to most (Eq. 2's α averaged over the words), strongest first."""
    import torch

    from matching.similarity import clipped_cosines, region_attention

    features, boxes, k, _ = store.get(image_id)
    with torch.inference_mode():
        device = next(model.parameters()).device
        images = model.encode_images(torch.from_numpy(features)[None].to(device), torch.tensor([k], device=device))
        captions = model.encode_captions(torch.tensor([tokens], device=device), torch.tensor([len(tokens)]))
        cos = clipped_cosines(images.local, captions.local, model.head.attention_clip)
        alpha = region_attention(cos, images.mask, captions.mask, model.head.lambda_i2t)[0, 0]  # (L, K)
        weights = alpha.mean(0)[:k].cpu().numpy()
    order = np.argsort(-weights)[:top]
    return [(boxes[i].tolist(), float(weights[i])) for i in order]


def search_images(model: TSHSR, vocab: Vocabulary, store: FeatureStore, text: str, *, k: int = 10,
                  image_ids: list[str] | None = None, device: str = "cpu", batch_size: int = 128,
                  with_regions: bool = False, encoded: Embedded | None = None) -> list[Hit]:
    """The gallery's `k` best images for a text, best first (`encoded`: the gallery from an index)."""
    tokens = encode_query(vocab, text)
    gallery = image_ids if image_ids is not None else store.image_ids
    images = encoded if encoded is not None else StoreImages(store, gallery)
    scores = score_matrix(model, images, [tokens], device=device, batch_size=batch_size)[:, 0]
    order = np.argsort(-scores, kind="stable")[:k]
    hits = [Hit(rank + 1, float(scores[i]), gallery[i], gallery[i]) for rank, i in enumerate(order)]
    if with_regions:
        for hit in hits:
            hit.regions = attended_regions(model, store, hit.image_id, tokens)
    return hits


def search_captions(model: TSHSR, vocab: Vocabulary, store: FeatureStore, image_id: str,
                    captions: list, *, k: int = 10, device: str = "cpu", batch_size: int = 128) -> list[Hit]:
    """The `k` captions (matching.captions.Caption objects) that best describe an image, best first."""
    from matching.captions import resolve_image_ids

    resolved = resolve_image_ids([image_id], store.image_ids)
    if image_id not in resolved:
        raise QueryError(f"image {image_id!r} is not in {store.directory}")
    feature_id = resolved[image_id]
    owners = resolve_image_ids({c.image_id for c in captions}, store.image_ids)
    tokens = [vocab.encode(c.text) for c in captions]
    scores = score_matrix(model, StoreImages(store, [feature_id]), tokens, device=device, batch_size=batch_size)[0]
    order = np.argsort(-scores, kind="stable")[:k]
    return [Hit(rank + 1, float(scores[i]), captions[i].text, feature_id,
                matches_query_image=owners.get(captions[i].image_id) == feature_id)
            for rank, i in enumerate(order)]
