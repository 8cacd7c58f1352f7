"""Using a trained model on a feature directory: retrieval evaluation and search."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from extract.safeio import atomic_write, write_json
from extract.shards import FeatureStore, ShardFormatError
from matching import checkpoint
from matching.data.captions import evaluation_set, read_captions, read_split, resolve_image_ids
from matching.data.text import Vocabulary, VocabularyError, tokenize
from matching.model.encoders import Embedded
from matching.model.tshsr import TSHSR
from matching.retrieval.metrics import MetricsError, evaluate_protocol, protocol_names
from matching.retrieval.scoring import StoreImages, encode_images, score_matrix
from matching.retrieval.shortlist import default_search_shortlist, require_first_stage, rerank_images


@dataclass
class EvaluationResult:
    """An evaluation of one checkpoint or an ensemble, for either task."""

    results: dict[str, Any]  # matching: {protocol name: metrics}; multi-query: {"rounds": [{"round", "r1", …}]}
    sims: np.ndarray | None  # matching: (n_images, n_images · cpi); multi-query: (rounds, n_sets, n_images)
    image_ids: list[str]
    num_captions: int  # captions (matching) or query sets (multi-query)
    split: str | None
    sources: list[str]  # the checkpoints and score files averaged
    task: str = "matching"
    shortlist: dict[str, Any] | None = None  # two-stage retrieval: {protocol: ShortlistReport}; sims is then None

    def to_json(self, **context: Any) -> dict[str, Any]:
        """The metrics file's content (`write_metrics`), with `context` (paths, …) first.

        Multi-query metrics are laid out as ``{"rounds": [{"round": 1, "r1": …, "r5", "r10", "meanr"}, …]}``.
        """
        head = {**context, "task": self.task, "split": self.split, "sources": self.sources,
                "num_images": len(self.image_ids)}
        if self.task == "multi-query":
            return {**head, "num_query_sets": self.num_captions, **self.results}
        return {**head, "num_captions": self.num_captions, "results": self.results}

    def table(self) -> str:
        """The metrics as the command prints them (with chance level for the rounds)."""
        from matching.retrieval.metrics import format_round_table, format_table, round_chance

        if self.task == "multi-query":
            return format_round_table(self.results, round_chance(len(self.image_ids)))
        lines = [format_table(self.results)]
        for name, report in (self.shortlist or {}).items():
            lines.append(f"{name}: {report.line()}")
        return "\n".join(lines)


def write_metrics(path: str | os.PathLike, result: EvaluationResult, **context: Any) -> Path:
    """Write an evaluation's metrics as JSON, atomically (the evaluate command and the pipeline's stage)."""
    return write_json(path, result.to_json(**context))


def write_sims(path: str | os.PathLike, sims: np.ndarray) -> Path:
    """Save a score matrix as .npy, atomically (a full disk leaves no 0-byte file)."""
    with atomic_write(path) as handle:
        np.save(handle, sims)
    return Path(path)


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


def load_sims(path: str | os.PathLike, shape: tuple[int, ...]) -> np.ndarray:
    """A saved score matrix (`--save-sims`) for the same images and captions; MetricsError otherwise."""
    try:
        sims = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise MetricsError(f"{path}: not a readable .npy score matrix ({str(error).splitlines()[0][:200]})") from None
    if sims.shape != shape:
        what = "(rounds × query sets × images)" if len(shape) == 3 else "(images × captions)"
        raise MetricsError(f"{path}: score matrix of shape {sims.shape}, but this split gives {shape} {what}; "
                           "was it saved for another split, model or --captions-per-image?")
    if not np.isfinite(sims).all():
        raise MetricsError(f"{path}: the score matrix holds NaN or infinite values")
    return sims.astype(np.float32)


def _mean(matrices: list[np.ndarray]) -> np.ndarray:
    return matrices[0] if len(matrices) == 1 else np.mean(matrices, axis=0, dtype=np.float64).astype(np.float32)


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
    shortlist: int | None = None,
    shortlist_index: str = "flat",
    log: Callable[[str], None] | None = None,
) -> EvaluationResult:
    """Score a split's images against its captions (or query sets) and compute the retrieval metrics.

    Several checkpoints (and score matrices saved by ``--save-sims``) are ensembled by
    averaging their score matrices, as SGRAF's SAF+SGR ensemble does and as HMRN ensembles
    its two directions. A multi-query checkpoint (`config.task`) with a multi-query JSONL file
    gives the per-round metrics of every test image; `protocol` and `captions_per_image`
    concern the matching task only. Under torchrun the images are shared among the ranks and
    every rank gets the same result.

    `shortlist` = K evaluates matching models by two-stage retrieval (`matching.retrieval.shortlist`):
    each caption re-ranks its K best images by first-stage cosine, each image its cpi·K best
    captions; the result then has no score matrix, and a `ShortlistReport` per protocol. A model
    without a trained first stage is refused (`NoFirstStageError`). `log`
    gets a progress line with the ETA every 30 s when no progress bar is shown.
    """
    from extract.runtime import Launch, resolve_device
    from matching.data.queries import is_query_file
    from matching.training.distributed import images_split_among_ranks, score_matrix_ranks, setup, teardown

    checkpoints = [checkpoint_path] if isinstance(checkpoint_path, (str, os.PathLike)) else list(checkpoint_path)
    if not checkpoints and not sims_files:
        raise MetricsError("nothing to evaluate: give a checkpoint or a saved score matrix")
    loaded = [checkpoint.load(path) for path in checkpoints]  # every file checked before any scoring
    task = _task_of(checkpoints, loaded, captions, is_query_file(captions))
    if vocab_path is not None:
        for _, _, vocab in loaded:
            check_vocab(vocab, vocab_path)
    store = FeatureStore(features)
    for path, (_, config, _) in zip(checkpoints, loaded, strict=True):
        check_features(store, config.model.img_dim, config.model.num_regions, path)
    if task == "multi-query":
        from matching.data.queries import read_query_sets, read_query_split, set_images
        from matching.model.hmrn import score_rounds

        sets = read_query_split(captions, split, "evaluation") if split else read_query_sets(captions)
        # Rounds: the models' max_turns (HMRN: 10), or those of the saved score matrices.
        turns = min((config.model.max_turns for _, config, _ in loaded), default=0) or _rounds_of(sims_files[0])
        image_ids = set_images(sets, store.image_ids, turns)
        query_tokens = [[[vocab.encode(q) for q in item.queries[:turns]] for item in sets] for _, _, vocab in loaded]
        shape: tuple[int, ...] = (turns, len(image_ids), len(image_ids))
        count = len(sets)
    else:
        selected = read_split(captions, split, "evaluation") if split else read_captions(captions)
        image_ids, ordered = evaluation_set(selected, store.image_ids, captions_per_image)
        protocol_names(len(image_ids), protocol)  # fail before scoring
        shape = (len(image_ids), len(ordered))
        count = len(ordered)
    if shortlist is not None:
        if task == "multi-query":
            raise MetricsError("--shortlist re-ranks a matching model's first-stage shortlist; a multi-query "
                               "model scores every image of the gallery")
        if sims_files:
            raise MetricsError("--shortlist scores only the shortlisted pairs: it cannot be averaged with full "
                               "score matrices (--sims)")
        if Launch.from_env().world_size > 1:
            raise MetricsError("--shortlist runs in one process; start evaluate without torchrun")
        from matching.retrieval.shortlist import require_first_stage, two_stage_metrics

        for path, (_, config, _) in zip(checkpoints, loaded, strict=True):
            require_first_stage(config, path)
        device_t = resolve_device(device)
        results, reports = two_stage_metrics(
            [model for model, _, _ in loaded], StoreImages(store, image_ids),
            [[vocab.encode(c.text) for c in ordered] for _, _, vocab in loaded], k=shortlist, protocol=protocol,
            captions_per_image=captions_per_image, kind=shortlist_index, device=device_t, batch_size=batch_size,
            progress=progress, log=log)
        for name, report in reports.items():
            results[name]["shortlist"] = dataclasses.asdict(report)
        return EvaluationResult(results, None, image_ids, count, split, [str(p) for p in checkpoints],
                                shortlist=reports)
    matrices = [load_sims(path, shape) for path in sims_files]
    launch, device_t = setup(device) if loaded else (None, None)
    try:
        images = StoreImages(store, image_ids)
        for index, (model, _, vocab) in enumerate(loaded):
            if task == "multi-query":
                matrices.append(images_split_among_ranks(
                    lambda share, model=model, tokens=query_tokens[index]: score_rounds(
                        model, share, tokens, rounds=turns, device=device_t, batch_size=batch_size,
                        memory_budget=memory_budget), images, launch, device_t, image_axis=2))
            else:
                tokens = [vocab.encode(c.text) for c in ordered]
                matrices.append(score_matrix_ranks(model, images, tokens, launch, device_t, batch_size=batch_size,
                                                   memory_budget=memory_budget, progress=progress and launch.is_main,
                                                   log=log if launch.is_main else None))
    finally:
        if launch is not None:
            teardown(launch)
    sims = _mean(matrices)
    sources = [str(p) for p in sims_files] + [str(p) for p in checkpoints]
    if task == "multi-query":
        from matching.retrieval.metrics import round_metrics

        return EvaluationResult(round_metrics(sims), sims, image_ids, count, split, sources, task)
    return EvaluationResult(evaluate_protocol(sims, protocol, captions_per_image), sims, image_ids, count,
                            split, sources)


def _rounds_of(path: str | os.PathLike) -> int:
    """The rounds of a saved multi-query score tensor (rounds × sets × images)."""
    try:
        shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
    except (OSError, ValueError) as error:
        raise MetricsError(f"{path}: not a readable .npy score matrix ({str(error).splitlines()[0][:200]})") from None
    if len(shape) != 3:
        raise MetricsError(f"{path}: a multi-query score tensor is (rounds × query sets × images), not {shape}")
    return int(shape[0])


def _task_of(checkpoints: list, loaded: list, data_file: str | os.PathLike, query_file: bool) -> str:
    """The task of an evaluation: its checkpoints', which must agree with each other and with the data file."""
    tasks = {config.task for _, config, _ in loaded}
    if len(tasks) > 1:
        raise MetricsError("an ensemble mixes matching and multi-query checkpoints: "
                           + ", ".join(f"{path} ({config.task})" for path, (_, config, _) in zip(checkpoints, loaded,
                                                                                                   strict=True)))
    task = tasks.pop() if tasks else ("multi-query" if query_file else "matching")
    if (task == "multi-query") != query_file:
        wanted = "a multi-query JSONL file (image_id, split, queries)" if task == "multi-query" else "a caption file"
        raise MetricsError(f"{data_file}: a {task} checkpoint is evaluated on {wanted}")
    return task


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
    round_ranks: list[int] | None = None  # multi-query: the image's 1-based rank after each round


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

    from matching.model.similarity import clipped_cosines, region_attention

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
                  with_regions: bool = False, encoded: Embedded | None = None, shortlist: int = 0) -> list[Hit]:
    """The gallery's `k` best images for a text, best first (`encoded`: the gallery from an index).

    `shortlist` > 0: two-stage search, the full model scores only the `max(shortlist, k)` images
    nearest to the text by first-stage cosine (`matching.retrieval.shortlist.rerank_images`); 0 scores every image.
    """
    tokens, _ = encode_query(vocab, text)
    gallery = image_ids if image_ids is not None else store.image_ids
    if shortlist and max(shortlist, k) < len(gallery):
        if encoded is None:
            with torch.inference_mode():
                encoded = encode_images(model.eval(), StoreImages(store, gallery), torch.device(device), batch_size)
        positions, scores = rerank_images(model, encoded, [tokens], max(shortlist, k), device=device,
                                          batch_size=batch_size)
        order = positions[np.argsort(-scores[:, 0], kind="stable")[:k]]
        best = dict(zip(positions.tolist(), scores[:, 0].tolist(), strict=True))
        hits = [Hit(rank + 1, best[i], gallery[i], gallery[i]) for rank, i in enumerate(order)]
    else:
        images = encoded if encoded is not None else StoreImages(store, gallery)
        scores = score_matrix(model, images, [tokens], device=device, batch_size=batch_size)[:, 0]
        order = np.argsort(-scores, kind="stable")[:k]
        hits = [Hit(rank + 1, float(scores[i]), gallery[i], gallery[i]) for rank, i in enumerate(order)]
    if with_regions:
        for hit in hits:
            hit.regions = attended_regions(model, store, hit.image_id, tokens)
    return hits


def query_regions(model: Any, store: FeatureStore, image_id: str, query_tokens: list[list[int]],
                  top: int = 3) -> list[tuple[list[float], float]]:
    """The regions a multi-query model's queries attend to most (its reasoning's query → region attention,
    averaged over the queries), strongest first."""
    import torch

    from matching.data.queries import pad_query_sets
    from matching.model.similarity import clipped_cosines, region_attention

    features, boxes, k, _ = store.get(image_id)
    with torch.inference_mode():
        device = next(model.parameters()).device
        images = model.encode_images(torch.from_numpy(features)[None].to(device), torch.tensor([k], device=device))
        tokens, lengths = pad_query_sets([query_tokens])
        queries = model.encode_queries(tokens.to(device), lengths.to(device))
        cosines = clipped_cosines(images.local, queries.local)  # (1, 1, K, T)
        alpha = region_attention(cosines, images.mask, queries.mask, model.reasoning.lam)[0, 0]  # (T, K)
        weights = alpha.mean(0)[:k].cpu().numpy()
    order = np.argsort(-weights)[:top]
    return [(boxes[i].tolist(), float(weights[i])) for i in order]


def search_query_set(model: Any, vocab: Vocabulary, store: FeatureStore, texts: Sequence[str], *, k: int = 10,
                     image_ids: list[str] | None = None, device: str = "cpu", batch_size: int = 128,
                     with_regions: bool = False, encoded: Embedded | None = None) -> tuple[list[Hit], list[str]]:
    """A multi-query model's `k` best images for queries given in rounds (ranked after the last round), with
    each hit's rank after every round; and the query words outside the vocabulary."""
    from matching.model.hmrn import score_rounds

    encoded_queries = [encode_query(vocab, text) for text in texts]
    tokens = [ids for ids, _ in encoded_queries]
    ignored = [word for _, unknown in encoded_queries for word in unknown]
    gallery = image_ids if image_ids is not None else store.image_ids
    images = encoded if encoded is not None else StoreImages(store, gallery)
    scores = score_rounds(model, images, [tokens], rounds=len(tokens), device=device, batch_size=batch_size)[:, 0]
    ranks = (-scores).argsort(axis=1, kind="stable").argsort(axis=1) + 1  # (R, N): each image's rank per round
    order = np.argsort(-scores[-1], kind="stable")[:k]
    hits = [Hit(rank + 1, float(scores[-1, i]), gallery[i], gallery[i], round_ranks=ranks[:, i].tolist())
            for rank, i in enumerate(order)]
    if with_regions:
        for hit in hits:
            hit.regions = query_regions(model, store, hit.image_id, tokens)
    return hits, ignored


def search_captions(model: TSHSR, vocab: Vocabulary, store: FeatureStore, image_id: str,
                    captions: list, *, k: int = 10, device: str = "cpu", batch_size: int = 128) -> list[Hit]:
    """The `k` captions (matching.data.captions.Caption objects) that best describe an image, best first."""
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
    shortlist: int = 0  # images the full model re-ranked after a global-cosine shortlist (0: it scored all)


def search(
    checkpoint_path: str | os.PathLike,
    features: str | os.PathLike,
    *,
    query: str | Sequence[str] | None = None,
    image_id: str | None = None,
    captions: str | os.PathLike | None = None,
    split: str | None = None,
    k: int = 10,
    index_path: str | os.PathLike | None = None,
    rebuild_index: bool = False,
    with_regions: bool = False,
    device: str = "auto",
    shortlist: int | None = None,
) -> SearchResult:
    """Rank the gallery's images for a text `query` (several texts, given in rounds, for a multi-query
    checkpoint), or the captions of `captions` for an `image_id` (matching checkpoints).

    `captions` + `split` limit a text search to the images of that split (a caption file, or a
    multi-query JSONL file); `index_path` keeps the gallery encoded by the model between searches
    (`matching.retrieval.index.open_index`). `shortlist`: a text search re-ranks only that many images
    nearest by first-stage cosine (0: every image; default: `SEARCH_SHORTLIST` for a model with a
    trained first stage, else 0; asked of a model without one, `NoFirstStageError`). QueryError,
    CaptionFormatError, ShardFormatError … for input that cannot be answered.
    """
    from extract.runtime import resolve_device
    from matching.retrieval.index import open_index

    texts = [query] if isinstance(query, str) else list(query or [])
    if bool(texts) == (image_id is not None):
        raise QueryError("give either a text QUERY or --image ID")
    if image_id is not None and captions is None:
        raise QueryError("--image needs --captions: the captions to rank")
    if split and captions is None:
        raise QueryError(f"--split {split} needs --captions: the file that says which images are in it")
    target = resolve_device(device)
    model, config, vocab = checkpoint.load(checkpoint_path, map_location=target)
    multi = config.task == "multi-query"
    if len(texts) > 1 and not multi:
        raise QueryError(f"{checkpoint_path} is a matching model: it ranks images for one text; several queries "
                         "given in rounds need a multi-query model (tshsr-pipe train --task multi-query)")
    if multi and image_id is not None:
        raise QueryError(f"{checkpoint_path} is a multi-query model: it ranks images for queries, not captions "
                         "for an image")
    store = FeatureStore(features)
    check_features(store, config.model.img_dim, config.model.num_regions, checkpoint_path)
    gallery_ids = None
    if captions is not None:
        gallery_ids, selected = gallery_of(captions, split)
    if image_id is not None:
        hits = search_captions(model, vocab, store, image_id, selected, k=k, device=target)
        return SearchResult(hits, "image", image_id, gallery_size=len(selected))
    gallery = store.image_ids
    if gallery_ids is not None:
        gallery = sorted(set(resolve_image_ids(gallery_ids, store.image_ids).values()))
        if not gallery:
            raise QueryError(f"{captions}: none of its {split or ''} images is in {store.directory}")
    encoded, built = None, False
    if index_path is not None:
        index = open_index(index_path, model, checkpoint_path, store, gallery, rebuild=rebuild_index, device=target)
        encoded, built = index.encoded, index.built
    if multi:
        hits, ignored = search_query_set(model, vocab, store, texts, k=k, image_ids=gallery, device=target,
                                         with_regions=with_regions, encoded=encoded)
        return SearchResult(hits, "text", " · ".join(texts), ignored, built, len(gallery))
    _, ignored = encode_query(vocab, texts[0])
    if shortlist:
        require_first_stage(config, checkpoint_path)
    shortlist = default_search_shortlist(config) if shortlist is None else shortlist
    shortlist = max(shortlist, k) if shortlist and max(shortlist, k) < len(gallery) else 0
    hits = search_images(model, vocab, store, texts[0], k=k, image_ids=gallery, device=target,
                         with_regions=with_regions, encoded=encoded, shortlist=shortlist)
    return SearchResult(hits, "text", texts[0], ignored, built, len(gallery), shortlist)


def gallery_of(data_file: str | os.PathLike, split: str | None) -> tuple[set[str], list]:
    """(the image ids of a caption or query-set file's split, its captions (none for query sets))."""
    from matching.data.queries import is_query_file, read_query_sets, read_query_split

    if is_query_file(data_file):
        sets = read_query_split(data_file, split, "search") if split else read_query_sets(data_file)
        return {item.image_id for item in sets}, []
    selected = read_split(data_file, split, "search") if split else read_captions(data_file)
    return {c.image_id for c in selected}, selected
