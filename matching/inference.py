"""Using a trained model on a feature directory: retrieval evaluation and search."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from extract.safeio import atomic_write_with, write_json
from extract.shards import FeatureStore, ShardFormatError
from matching import checkpoint
from matching.captions import evaluation_set, read_captions, read_split, resolve_image_ids
from matching.encoders import Embedded
from matching.evaluation import MetricsError, evaluate_protocol, protocol_names
from matching.model import TSHSR
from matching.scoring import StoreImages, score_matrix
from matching.text import Vocabulary, VocabularyError, tokenize


@dataclass
class EvaluationResult:
    results: dict[str, dict[str, Any]]  # protocol name → metrics
    sims: np.ndarray  # (n_images, n_images · cpi): the mean of the sources' matrices
    image_ids: list[str]
    num_captions: int
    split: str | None
    sources: list[str]  # the checkpoints and score files averaged

    def to_json(self, **context: Any) -> dict[str, Any]:
        """The metrics file's content (`write_metrics`), with `context` (paths, …) first."""
        return {**context, "split": self.split, "sources": self.sources, "num_images": len(self.image_ids),
                "num_captions": self.num_captions, "results": self.results}


def write_metrics(path: str | os.PathLike, result: EvaluationResult, **context: Any) -> Path:
    """Write an evaluation's metrics as JSON, atomically (the evaluate command and the pipeline's stage)."""
    return write_json(path, result.to_json(**context))


def write_sims(path: str | os.PathLike, sims: np.ndarray) -> Path:
    """Save a score matrix as .npy, atomically (a full disk leaves no 0-byte file)."""
    def save(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.save(handle, sims)

    return atomic_write_with(path, save)


def check_features(store: FeatureStore, img_dim: int, num_regions: int, checkpoint_path: object = "the model") -> None:
    """The feature directory must fit the model's input: a clear error otherwise."""
    if store.feature_dim != img_dim:
        raise ShardFormatError(f"{store.directory}: features are {store.feature_dim}-d, {checkpoint_path} "
                               f"expects {img_dim}-d region features")
    if store.max_boxes > num_regions:
        raise ShardFormatError(f"{store.directory}: images have up to {store.max_boxes} boxes, {checkpoint_path} "
                               f"was built for {num_regions}")


def check_vocab(vocab: Vocabulary, vocab_path: str | os.PathLike) -> None:
    """A vocabulary file given beside a checkpoint must be the checkpoint's own."""
    given = Vocabulary.load(vocab_path)
    if given != vocab:
        differ = next((i for i, (a, b) in enumerate(zip(given.words, vocab.words, strict=False)) if a != b),
                      min(len(given), len(vocab)))
        raise VocabularyError(f"{vocab_path}: does not match the checkpoint's vocabulary "
                              f"({len(given)} vs {len(vocab)} words, first difference at index {differ})")


def load_sims(path: str | os.PathLike, shape: tuple[int, int]) -> np.ndarray:
    """A saved score matrix (`--save-sims`) for the same images and captions; MetricsError otherwise."""
    try:
        sims = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise MetricsError(f"{path}: not a readable .npy score matrix ({str(error).splitlines()[0][:200]})") from None
    if sims.shape != shape:
        raise MetricsError(f"{path}: score matrix of shape {sims.shape}, but this split gives {shape} "
                           "(images × captions); was it saved for another split or --captions-per-image?")
    if not np.isfinite(sims).all():
        raise MetricsError(f"{path}: the score matrix holds NaN or infinite values")
    return sims.astype(np.float32)


def evaluate_checkpoint(
    checkpoint_path: str | os.PathLike | Sequence[str | os.PathLike],
    features: str | os.PathLike,
    captions: str | os.PathLike,
    *,
    sims_files: Sequence[str | os.PathLike] = (),
    split: str | None = "test",
    protocol: str = "all",
    captions_per_image: int = 5,
    vocab_path: str | os.PathLike | None = None,
    device: str = "auto",
    batch_size: int = 128,
    memory_budget: int | None = None,
    progress: bool = False,
) -> EvaluationResult:
    """Score a split's images against its captions and compute the retrieval metrics.

    Several checkpoints (and score matrices saved by ``--save-sims``) are ensembled by
    averaging their score matrices, as SGRAF's SAF+SGR ensemble does. Under torchrun the
    images are shared among the ranks (each scores its slice of the matrix's rows) and every
    rank gets the same result.
    """
    from matching.distributed import score_matrix_ranks, setup, teardown

    checkpoints = [checkpoint_path] if isinstance(checkpoint_path, (str, os.PathLike)) else list(checkpoint_path)
    if not checkpoints and not sims_files:
        raise MetricsError("nothing to evaluate: give a checkpoint or a saved score matrix")
    loaded = [checkpoint.load(path) for path in checkpoints]  # every file checked before any scoring
    if vocab_path is not None:
        for _, _, vocab in loaded:
            check_vocab(vocab, vocab_path)
    store = FeatureStore(features)
    for path, (_, config, _) in zip(checkpoints, loaded, strict=True):
        check_features(store, config.model.img_dim, config.model.num_regions, path)
    selected = read_split(captions, split, "evaluation") if split else read_captions(captions)
    image_ids, ordered = evaluation_set(selected, store.image_ids, captions_per_image)
    protocol_names(len(image_ids), protocol)  # fail before scoring
    shape = (len(image_ids), len(ordered))
    matrices = [load_sims(path, shape) for path in sims_files]
    launch, device_t = setup(device) if loaded else (None, None)
    try:
        for model, _, vocab in loaded:
            tokens = [vocab.encode(c.text) for c in ordered]
            matrices.append(score_matrix_ranks(model, StoreImages(store, image_ids), tokens, launch, device_t,
                                               batch_size=batch_size, memory_budget=memory_budget,
                                               progress=progress and launch.is_main))
    finally:
        if launch is not None:
            teardown(launch)
    sims = matrices[0] if len(matrices) == 1 else np.mean(matrices, axis=0, dtype=np.float64).astype(np.float32)
    sources = [str(p) for p in sims_files] + [str(p) for p in checkpoints]
    return EvaluationResult(evaluate_protocol(sims, protocol, captions_per_image), sims, image_ids, len(ordered),
                            split, sources)


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


def encode_query(vocab: Vocabulary, text: str) -> tuple[list[int], list[str]]:
    """(token ids, the words the vocabulary does not know and the model therefore ignores)."""
    tokens = vocab.encode(text)
    unknown = [word for word in tokenize(text) if word not in vocab.word2idx]
    if all(t == 3 for t in tokens[1:-1]):
        raise QueryError(f"none of the words of {text!r} is in the model's vocabulary of {len(vocab)} words")
    return tokens, unknown


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
    tokens, _ = encode_query(vocab, text)
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


@dataclass
class SearchResult:
    """What `search` found, and what the user should know about how."""

    hits: list[Hit]
    mode: str  # "text" (text → images) or "image" (image → captions)
    query: str
    ignored_words: list[str] = field(default_factory=list)  # query words outside the vocabulary
    index_built: bool = False  # the gallery was encoded into a new index file by this call
    gallery_size: int = 0


def search(
    checkpoint_path: str | os.PathLike,
    features: str | os.PathLike,
    *,
    query: str | None = None,
    image_id: str | None = None,
    captions: str | os.PathLike | None = None,
    split: str | None = None,
    k: int = 10,
    index_path: str | os.PathLike | None = None,
    rebuild_index: bool = False,
    with_regions: bool = False,
    device: str = "auto",
) -> SearchResult:
    """Rank the gallery's images for a text `query`, or the captions of `captions` for an `image_id`.

    `captions` + `split` limit a text search to the images of that split; `index_path` keeps
    the gallery encoded by the model between searches (`matching.index.open_index`).
    QueryError, CaptionFormatError, ShardFormatError … for input that cannot be answered.
    """
    from extract.runtime import resolve_device
    from matching.index import open_index

    if (query is None) == (image_id is None):
        raise QueryError("give either a text QUERY or --image ID")
    if image_id is not None and captions is None:
        raise QueryError("--image needs --captions: the captions to rank")
    if split and captions is None:
        raise QueryError(f"--split {split} needs --captions: the file that says which images are in it")
    target = resolve_device(device)
    model, config, vocab = checkpoint.load(checkpoint_path, map_location=target)
    store = FeatureStore(features)
    check_features(store, config.model.img_dim, config.model.num_regions, checkpoint_path)
    selected = None
    if captions is not None:
        selected = read_split(captions, split, "search") if split else read_captions(captions)
    if image_id is not None:
        hits = search_captions(model, vocab, store, image_id, selected or [], k=k, device=target)
        return SearchResult(hits, "image", image_id, gallery_size=len(selected or []))
    gallery = store.image_ids
    if selected is not None:
        gallery = sorted(set(resolve_image_ids({c.image_id for c in selected}, store.image_ids).values()))
        if not gallery:
            raise QueryError(f"{captions}: none of its {split or ''} images is in {store.directory}")
    _, ignored = encode_query(vocab, query)
    encoded, built = None, False
    if index_path is not None:
        index = open_index(index_path, model, checkpoint_path, store, gallery, rebuild=rebuild_index, device=target)
        encoded, built = index.encoded, index.built
    hits = search_images(model, vocab, store, query, k=k, image_ids=gallery, device=target,
                         with_regions=with_regions, encoded=encoded)
    return SearchResult(hits, "text", query, ignored, built, len(gallery))
