"""The one search path: a model and its gallery loaded once, queries answered by the model's task.

`tshsr-pipe search` (one query, `search`), `tshsr-pipe serve` (many) and the library all go
through `SearchEngine`. It loads the checkpoint once, encodes the gallery once (or opens it,
memory-mapped, from an encoded gallery on disk, `matching.retrieval.gallery`), and answers:

- `search(queries, k)`: one query, or several given in rounds → images, each hit with its rank
  after every round and the regions the (latest) query attends to;
- `image_captions(image_id, k)`: image → the caption gallery's captions, the image's own marked
  (for a task that ranks captions).

What varies by task is asked of the task (`matching.tasks.base.Task`): the ranker that chooses
and scores the candidates (every image, or a first-stage shortlist re-scored exactly; the
scores after each round: a matching model's mean of the queries' scores, HMRN's own rounds),
the regions a hit shows, and the scores of captions for an image. Whether a search shortlists
is decided once, in `SearchEngine.open` (`decide_shortlist`).

Not thread-safe: a server calls one engine from one worker thread (pipelines.serve.worker).
No web or image-file code here: `matching` imports only torch, numpy and extract's leaves.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from extract.shards import FeatureStore
from matching import checkpoint
from matching.config import SEARCH_SHORTLIST, Config, EvaluationSettings
from matching.data.captions import Caption, resolve_image_ids
from matching.data.text import Vocabulary, tokenize
from matching.retrieval.gallery import EncodedGallery
from matching.retrieval.scoring import matmul_precision
from matching.tasks import get_task, task_of_data
from matching.tasks.base import Ranking

REGIONS_SHOWN = 3  # attended regions returned with each image hit


class QueryError(ValueError):
    """A search query that cannot be answered (no known word, an unknown image id)."""


class UnknownImageError(LookupError):
    """An image id that is not in the engine's gallery."""


@dataclass
class Hit:
    """One search result: an image (text → image) or a caption (image → text)."""

    rank: int  # 1-based
    score: float
    item: str  # image id, or caption text
    image_id: str  # the image shown: the hit itself, or the query image
    matches_query_image: bool = False  # image → text: the caption belongs to the query image
    regions: list[tuple[list[float], float]] | None = None  # (box x1 y1 x2 y2, attention weight), strongest first
    round_ranks: list[int] | None = None  # several queries: the image's 1-based rank after each round
    image_size: tuple[int, int] | None = None  # (height, width) of the image the boxes refer to


class Ranker(Protocol):
    """Chooses which gallery images a task's model scores for a search, and scores them (`Task.ranker`)."""

    name: str  # "exact", "shortlist", …, for the service's status
    shortlist: int  # images a query re-ranks after the first stage (0: every image)

    def rank(self, queries: list[list[int]], k: int) -> Ranking:
        """Candidates for token-id queries and their scores after each round; they include the `k` best."""
        ...


@dataclass
class Found:
    """What a search found: the last round's best images, and the words the model ignored."""

    hits: list[Hit]  # best first; each with its rank after every round and, when asked, its regions
    ignored_words: list[list[str]]  # per query: its words outside the vocabulary
    combination: str  # how the rounds' scores were made (the task's `combination`)
    shortlist: int = 0  # images the model re-ranked after the first stage (0: it scored every image)


@dataclass
class CaptionsResult:
    """`image_captions`: the best captions of the caption gallery for an image, and its own captions."""

    image_id: str
    hits: list[Hit]  # item: caption text; matches_query_image: one of the image's own captions
    own_captions: list[str]


@dataclass
class EngineInfo:
    """What the engine serves, for a status endpoint."""

    checkpoint: str
    task: str
    gallery_size: int
    captions: int  # captions in the caption gallery (0: image → text not available)
    device: str
    ranker: str
    multi_query: str  # how several queries combine (the task's `combination`)
    index_path: str | None
    index_built: bool
    start_seconds: float  # time to load the model and encode the galleries
    shortlist: int = 0  # images a query re-ranks after the first-stage shortlist (0: every image)
    precision: str = "float32"  # the scorers' arithmetic


def encode_query(vocab: Vocabulary, text: str, wrap: str = "start-end") -> tuple[list[int], list[str]]:
    """(token ids wrapped by `wrap` (the model's, `Task.text_wrap`), the words the vocabulary does not know and the
    model therefore ignores)."""
    tokens = vocab.encode(text, wrap)
    words = tokenize(text)
    unknown = [word for word in words if word not in vocab.word2idx]
    if len(unknown) == len(words):
        raise QueryError(f"none of the words of {text!r} is in the model's vocabulary of {len(vocab)} words")
    return tokens, unknown


def check_features(store: FeatureStore, img_dim: int, num_regions: int, checkpoint_path: object = "the model") -> None:
    """The feature directory must fit the model's input: a clear error otherwise."""
    from extract.shards import ShardFormatError

    if store.feature_dim != img_dim:
        raise ShardFormatError(f"{store.directory}: features are {store.feature_dim}-d, {checkpoint_path} "
                               f"expects {img_dim}-d region features")
    if store.max_boxes > num_regions:
        raise ShardFormatError(f"{store.directory}: images have up to {store.max_boxes} boxes, {checkpoint_path} "
                               f"was built for {num_regions}")


def gallery_of(data_file: str | os.PathLike, split: str | None) -> tuple[set[str], list[Caption]]:
    """(the image ids of a data file's split, its captions (none for query sets)), read by the file's task."""
    return task_of_data(data_file).gallery(data_file, split)


def gallery_ids(store: FeatureStore, captions: str | os.PathLike | None, split: str | None,
                images: Sequence[str] | None = None) -> tuple[list[str], list[Caption]]:
    """(the gallery's feature ids, the captions of an image → text search): every image of the store, or
    those of a data file's split (and its captions), or the `images` given; QueryError when none is left."""
    selected: list[Caption] = []
    gallery = store.image_ids
    if captions is not None:
        image_ids, selected = gallery_of(captions, split)
        gallery = sorted(set(resolve_image_ids(image_ids, store.image_ids).values()))
        if not gallery and images is None:
            raise QueryError(f"{captions}: none of its {split or ''} images is in {store.directory}")
    if images is not None:  # these images whatever the captions' split
        known = set(store.image_ids)
        gallery = [image_id for image_id in images if image_id in known]
        if not gallery:
            raise QueryError(f"none of the images {list(images)[:3]} is in {store.directory}")
    return gallery, selected


def index_gallery(checkpoint_path: str | os.PathLike, features: str | os.PathLike, out: str | os.PathLike, *,
                  captions: str | os.PathLike | None = None, split: str | None = None, dtype: str = "float16",
                  index_kind: str = "auto", device: str = "auto", batch_size: int = 128,
                  progress: Callable[[int], None] | None = None) -> EncodedGallery:
    """Encode a gallery once into an encoded gallery at `out` (`tshsr-pipe index`): every image of `features`,
    or those of a data file's split. Started by torchrun, the processes share the images and rank 0 merges
    their parts (`matching.retrieval.gallery.build_gallery`)."""
    from matching.retrieval.gallery import build_gallery
    from matching.training.distributed import setup, teardown

    launch, target = setup(device)
    try:
        model, config, _ = checkpoint.load(checkpoint_path, map_location=target)
        store = FeatureStore(features)
        check_features(store, config.model.img_dim, config.model.num_regions, checkpoint_path)
        gallery, _ = gallery_ids(store, captions, split)
        return build_gallery(model, checkpoint_path, store, gallery, out, device=target, batch_size=batch_size,
                             dtype=dtype, index_kind=index_kind, launch=launch, progress=progress)
    finally:
        teardown(launch)


def decide_shortlist(config: Config, asked: int | None, gallery_size: int, source: object) -> int:
    """The images a search re-ranks after the first stage: 0 scores every image.

    `asked` None: `SEARCH_SHORTLIST` for a model with a trained first stage and a gallery larger than
    that, else 0; 0: every image; K > 0: K (NoFirstStageError for a model without a first stage).
    """
    from matching.retrieval.shortlist import require_first_stage

    task = get_task(config.task)
    if asked is None:
        asked = SEARCH_SHORTLIST if task.has_first_stage(config) else 0
    elif asked:
        require_first_stage(config, source)
    return asked if asked and asked < gallery_size else 0


class SearchEngine:
    """A loaded model with its gallery encoded once; see the module docstring."""

    def __init__(self, model: torch.nn.Module, config: Config, vocab: Vocabulary, encoded: EncodedGallery, *,
                 captions: Sequence[Caption] = (), device: torch.device | str = "cpu", shortlist: int = 0,
                 batch_size: int = 128, precision: str = "float32") -> None:
        device = torch.device(device)
        self.task = get_task(config.task)
        self.model, self.config, self.vocab = model.eval().to(device), config, vocab
        self.gallery = list(encoded.image_ids)
        self.encoded, self.device, self.batch_size = encoded, device, batch_size
        self.precision = precision  # the ranker's arithmetic (EvaluationSettings.precision)
        self.position = {image_id: i for i, image_id in enumerate(self.gallery)}
        self.ranker = self.task.ranker(self.model, self.encoded, device, shortlist, batch_size)
        self.captions = list(captions)
        owners = resolve_image_ids({c.image_id for c in self.captions}, self.gallery)
        self.caption_owner = [owners.get(c.image_id) for c in self.captions]  # gallery id or None
        self.wrap = self.task.text_wrap(config)  # how the model reads a text (`Task.text_wrap`)
        self._caption_tokens: list[list[int]] | None = None  # tokenised on first use (`caption_tokens`)
        self._caption_cache: dict[str, Any] = {}  # the task's encoded caption gallery, made on first use
        self.info = EngineInfo(checkpoint="", task=config.task, gallery_size=len(self.gallery),
                               captions=len(self.captions), device=str(device), ranker=self.ranker.name,
                               multi_query=self.task.combination, index_path=None, index_built=encoded.built,
                               start_seconds=0.0, shortlist=self.ranker.shortlist, precision=precision)

    @classmethod
    def open(cls, checkpoint_path: str | os.PathLike, features: str | os.PathLike, *,
             captions: str | os.PathLike | None = None, index_path: str | os.PathLike | None = None,
             rebuild_index: bool = False, device: str = "auto", settings: EvaluationSettings | None = None,
             images: Sequence[str] | None = None) -> SearchEngine:
        """Load a checkpoint and a gallery once.

        `captions` (+ `settings.split`) limit the gallery to the split's images and are the
        caption gallery of `image_captions` (a caption file; a multi-query file gives its images
        only). `images` limits the gallery further to these ids. `index_path` loads (or builds) the
        encoded gallery from a search index; without it the gallery is encoded in memory.
        `settings.shortlist`: see `decide_shortlist`.
        QueryError, CheckpointError, ShardFormatError, SearchIndexError … for input that cannot serve.
        """
        from extract.runtime import resolve_device
        from matching.retrieval.gallery import EncodedGallery, open_gallery

        settings = settings or EvaluationSettings(split=None)
        started = time.perf_counter()
        if settings.split and captions is None:
            raise QueryError(f"--split {settings.split} needs --captions: the file that says which images are in it")
        target = resolve_device(device)
        model, config, vocab = checkpoint.load(checkpoint_path, map_location=target)
        store = FeatureStore(features)
        check_features(store, config.model.img_dim, config.model.num_regions, checkpoint_path)
        gallery, selected = gallery_ids(store, captions, settings.split, images)
        shortlist = decide_shortlist(config, settings.shortlist, len(gallery), checkpoint_path)
        if index_path is not None:
            encoded = open_gallery(index_path, model, checkpoint_path, store, gallery, rebuild=rebuild_index,
                                   device=target, batch_size=settings.batch_size)
        else:
            encoded = EncodedGallery.encode(model, store, gallery, device=target, batch_size=settings.batch_size)
        store.close()  # everything a search needs is in the encoded gallery: the shards may change from here on
        engine = cls(model, config, vocab, encoded, captions=selected, device=target, shortlist=shortlist,
                     batch_size=settings.batch_size, precision=settings.validate().precision)
        engine.info.checkpoint = str(checkpoint_path)
        engine.info.index_path = str(index_path) if index_path is not None else None
        engine.info.start_seconds = time.perf_counter() - started
        return engine

    # ------------------------------------------------------------------ text → images

    def search(self, queries: Sequence[str], k: int, *, regions: bool = True) -> Found:
        """The `k` best gallery images for one query or several given in rounds, best first.

        Round r ranks by the task's score after the first r queries; each hit carries its rank
        after every round (1-based, among the ranker's candidates) and, with `regions`, the
        regions the latest query attends to most (what the last round added).
        """
        if not queries:
            raise QueryError("give at least one query")
        encoded = []
        for number, text in enumerate(queries, 1):
            try:
                encoded.append(encode_query(self.vocab, text, self.wrap))
            except QueryError as error:
                raise QueryError(f"query {number}: {error}" if len(queries) > 1 else str(error)) from None
        tokens = [ids for ids, _ in encoded]
        with matmul_precision(self.precision, self.device):
            ranking = self.ranker.rank(tokens, k)
        rounds = ranking.scores  # (c, R)
        ranks = np.empty(rounds.shape, np.int64)  # (c, R): the rank of each candidate after each round
        for r in range(rounds.shape[1]):
            ranks[np.argsort(-rounds[:, r], kind="stable"), r] = np.arange(1, len(rounds) + 1)
        order = np.argsort(-rounds[:, -1], kind="stable")[:k]
        positions = ranking.positions[order]
        weights = (self.task.regions(self.model, self.encoded.select(positions, self.device), tokens, ranking)
                   if regions and len(positions) else None)
        hits = []
        for rank, (row, position) in enumerate(zip(order, positions, strict=True), 1):
            image_id = self.gallery[int(position)]
            hit = Hit(rank, float(rounds[row, -1]), image_id, image_id, round_ranks=ranks[row].tolist())
            if weights is not None:
                boxes, size = self.encoded.display(int(position))
                strongest = np.argsort(-weights[rank - 1][:len(boxes)])[:REGIONS_SHOWN]
                hit.regions = [(boxes[i].tolist(), float(weights[rank - 1][i])) for i in strongest]
                hit.image_size = size
            hits.append(hit)
        return Found(hits, [ignored for _, ignored in encoded], self.task.combination, self.ranker.shortlist)

    def search_text(self, query: str, k: int) -> Found:
        """The `k` best gallery images for one text (`search` with one query)."""
        return self.search([query], k)

    # ------------------------------------------------------------------ image → captions

    @property
    def caption_tokens(self) -> list[list[int]]:
        """The caption gallery's token ids, made on the first image → captions request: a text search never
        needs them, so a server's start does not wait for a whole caption file to be tokenised."""
        if self._caption_tokens is None:
            self._caption_tokens = [self.vocab.encode(c.text, self.wrap) for c in self.captions]
        return self._caption_tokens

    def image_captions(self, image_id: str, k: int) -> CaptionsResult:
        """The `k` captions of the caption gallery that best describe a gallery image, best first."""
        position = self.require(image_id)
        image = self.encoded.select([position], self.device)
        with matmul_precision(self.precision, self.device):
            scores = self.task.caption_scores(self.model, image, self.caption_tokens, self._caption_cache)
        order = np.argsort(-scores, kind="stable")[:k]
        hits = [Hit(rank, float(scores[i]), self.captions[i].text, image_id,
                    matches_query_image=self.caption_owner[i] == image_id) for rank, i in enumerate(order, 1)]
        own = [c.text for c, owner in zip(self.captions, self.caption_owner, strict=True) if owner == image_id]
        return CaptionsResult(image_id, hits, own)

    # ------------------------------------------------------------------ the gallery

    def require(self, image_id: str) -> int:
        """The gallery position of an image id; UnknownImageError if it is not in the gallery."""
        try:
            return self.position[image_id]
        except (KeyError, TypeError):
            raise UnknownImageError(f"image {image_id!r} is not in the gallery") from None


@dataclass
class SearchResult:
    """What `search` found, and what the user should know about how."""

    hits: list[Hit]
    mode: str  # "text" (text → images) or "image" (image → captions)
    query: str
    ignored_words: list[str] = field(default_factory=list)  # query words outside the vocabulary
    index_built: bool = False  # the gallery was encoded into a new index file by this call
    gallery_size: int = 0
    shortlist: int = 0  # images the full model re-ranked after the first stage (0: it scored all)


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
    precision: str = "float32",
) -> SearchResult:
    """One search through a `SearchEngine` opened for it: images for a text `query` (several texts, given
    in rounds), or the captions of `captions` for an `image_id`.

    `captions` + `split` limit a text search to the images of that split; `index_path` keeps the
    gallery encoded by the model between searches; `shortlist` as `decide_shortlist`; `precision`
    the scorers' arithmetic (EvaluationSettings.precision).
    QueryError, CaptionFormatError, ShardFormatError … for input that cannot be answered.
    """
    texts = [query] if isinstance(query, str) else list(query or [])
    if bool(texts) == (image_id is not None):
        raise QueryError("give either a text QUERY or --image ID")
    if image_id is not None and captions is None:
        raise QueryError("--image needs --captions: the captions to rank")
    settings = EvaluationSettings(split=split, shortlist=shortlist, precision=precision)
    if image_id is not None:  # only the query image is encoded; the captions are its gallery
        store = FeatureStore(features)
        resolved = resolve_image_ids([image_id], store.image_ids).get(image_id)
        if resolved is None:
            raise QueryError(f"image {image_id!r} is not in {store.directory}")
        engine = SearchEngine.open(checkpoint_path, features, captions=captions, device=device, settings=settings,
                                   images=[resolved])
        found = engine.image_captions(resolved, k)
        return SearchResult(found.hits, "image", image_id, gallery_size=len(engine.captions))
    engine = SearchEngine.open(checkpoint_path, features, captions=captions, index_path=index_path,
                               rebuild_index=rebuild_index, device=device, settings=settings)
    base = {"index_built": engine.info.index_built, "gallery_size": len(engine.gallery)}
    result = engine.search(texts, k, regions=with_regions)
    return SearchResult(result.hits, "text", " · ".join(texts), [w for words in result.ignored_words for w in words],
                        shortlist=result.shortlist, **base)
