"""A search engine that stays loaded: the model, the encoded gallery and the caption gallery, once.

`search` (matching.retrieval.evaluate) loads everything for one query; a server answers many. The
`SearchEngine` loads the checkpoint and the feature store once, encodes the gallery once (or
takes it from a search index, `matching.retrieval.index.open_index`) and the caption gallery once (within
a memory budget), then answers:

- `search_text(query, k)`: text → images, with the regions the words attend to;
- `search_queries(queries, k)`: several queries given in rounds → images, with each image's
  rank after every round (for this single-query matching model: the mean of the queries'
  scores, `MEAN_OF_QUERIES`; a multi-query checkpoint answers with its own rounds, `ROUNDS`);
- `image_captions(image_id, k)`: image → captions, the image's own captions marked.

Which images get the model's full score is the `Ranker`'s business: `ExactRanker` scores the
whole gallery; `ShortlistRanker` only the images nearest to the queries by first-stage cosine,
re-scored exactly (two-stage search); others plug in through `RANKERS` without changing the engine.

Not thread-safe: a server calls one engine from one worker thread (pipelines.serve.worker).
No web or image-file code here: `matching` imports only torch, numpy and extract's leaves.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from extract.shards import FeatureStore
from matching import checkpoint
from matching.data.captions import Caption, resolve_image_ids
from matching.data.text import Vocabulary
from matching.model.encoders import Embedded
from matching.model.hmrn import HMRN
from matching.model.tshsr import TSHSR
from matching.retrieval.evaluate import Hit, QueryError, check_features, encode_query, gallery_of, search_query_set
from matching.retrieval.scoring import StoreImages, encode_captions, encode_images, score_matrix
from matching.retrieval.shortlist import (
    SEARCH_SHORTLIST,
    CaptionGroups,
    default_search_shortlist,
    encode_queries,
    first_stage_vectors,
    global_vectors,
    require_first_stage,
    rerank_images,
)

MEAN_OF_QUERIES = "mean"  # search_queries ranks by the mean of the queries' scores
ROUNDS = "rounds"  # a multi-query checkpoint ranks by its own score after each round (HMRN)
REGIONS_SHOWN = 3  # attended regions returned with each image hit
CAPTION_CACHE_BYTES = 2 << 30  # caption embeddings kept in memory up to this size


class UnknownImageError(LookupError):
    """An image id that is not in the engine's gallery."""


@dataclass
class Candidates:
    """What a ranker found for a set of queries: gallery positions and their exact scores."""

    index: np.ndarray  # (c,) int64 positions in the gallery; every image for ExactRanker
    scores: np.ndarray  # (c, q) float32: the model's score of each candidate for each query
    queries: CaptionGroups | None = None  # the queries as the model encoded them, when the ranker kept them


class Ranker(Protocol):
    """Chooses which gallery images the model scores for a set of queries."""

    name: str

    def candidates(self, queries: Sequence[Sequence[int]], k: int) -> Candidates:
        """Candidates for token-id queries; must include the `k` best by the combined score it serves."""
        ...


class ExactRanker:
    """Every gallery image scored by the full model (the scores `tshsr-pipe search` gives)."""

    name = "exact"

    def __init__(self, model: TSHSR, encoded: Embedded, device: torch.device, batch_size: int = 128) -> None:
        self.model, self.encoded, self.device, self.batch_size = model, encoded, device, batch_size

    def candidates(self, queries: Sequence[Sequence[int]], k: int) -> Candidates:
        scores = score_matrix(self.model, self.encoded, queries, device=self.device, batch_size=self.batch_size)
        return Candidates(np.arange(len(self.encoded)), scores)


class ShortlistRanker:
    """Two-stage: the `shortlist` images nearest by first-stage cosine (to each query and to their mean),
    re-scored by the full model (`matching.retrieval.shortlist.rerank_images`). The gallery's first-stage vectors
    are computed once, here."""

    name = "shortlist"

    def __init__(self, model: TSHSR, encoded: Embedded, device: torch.device, batch_size: int = 128,
                 shortlist: int = SEARCH_SHORTLIST) -> None:
        self.model, self.encoded, self.device, self.batch_size = model, encoded, device, batch_size
        self.shortlist = shortlist
        with torch.inference_mode():
            self.vectors = global_vectors(first_stage_vectors(model.eval(), encoded, "images"))

    def candidates(self, queries: Sequence[Sequence[int]], k: int) -> Candidates:
        encoded = encode_queries(self.model, queries, self.device, self.batch_size)
        index, scores = rerank_images(self.model, self.encoded, encoded, max(self.shortlist, k),
                                      image_vectors=self.vectors, device=self.device, batch_size=self.batch_size)
        return Candidates(index, scores, encoded)


# name → factory(model, encoded gallery, device): how `SearchEngine.open(ranker=…)` builds one;
# "auto" (the default) is "shortlist" for a model with a trained first stage, else "exact".
RANKERS: dict[str, Callable[[TSHSR, Embedded, torch.device], Ranker]] = {"exact": ExactRanker,
                                                                          "shortlist": ShortlistRanker}
RANKER_CHOICES = ("auto", *RANKERS)


@dataclass
class ImageHit:
    """A text → image result with what a page needs to draw it."""

    hit: Hit  # rank, score, image id, attended regions (box x1 y1 x2 y2 in image pixels, weight)
    image_size: tuple[int, int]  # (height, width) of the image the boxes refer to
    rank_by_round: list[int] = field(default_factory=list)  # search_queries: the rank after each round


@dataclass
class TextResult:
    """`search_text`: the hits and the words the model ignored."""

    hits: list[ImageHit]
    ignored_words: list[str]


@dataclass
class RoundsResult:
    """`search_queries`: the final round's hits, each with its rank after every round."""

    hits: list[ImageHit]
    ignored_words: list[list[str]]  # per query
    combination: str  # how the queries' scores were combined (MEAN_OF_QUERIES)


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
    gallery_size: int
    captions: int  # captions in the caption gallery (0: image → text not available)
    device: str
    ranker: str
    multi_query: str  # MEAN_OF_QUERIES for a single-query matching model
    index_path: str | None
    index_built: bool
    start_seconds: float  # time to load the model and encode the galleries
    shortlist: int = 0  # images a query re-ranks after the global-cosine shortlist (0: every image)


class SearchEngine:
    """A loaded model with its gallery encoded once; see the module docstring."""

    def __init__(self, model: TSHSR, vocab: Vocabulary, store: FeatureStore, gallery: list[str], *,
                 encoded: Embedded, captions: Sequence[Caption] = (), device: torch.device | str = "cpu",
                 ranker: Ranker | None = None, batch_size: int = 128,
                 caption_cache_bytes: int = CAPTION_CACHE_BYTES) -> None:
        if len(encoded) != len(gallery):
            raise ValueError(f"{len(encoded)} encoded images for a gallery of {len(gallery)}")
        device = torch.device(device)
        self.model, self.vocab, self.store, self.gallery = model.eval().to(device), vocab, store, list(gallery)
        self.encoded, self.device, self.batch_size = encoded.to(device), device, batch_size
        self.position = {image_id: i for i, image_id in enumerate(self.gallery)}
        self.ranker = ranker or ExactRanker(self.model, self.encoded, device, batch_size)
        self.multi = isinstance(model, HMRN)
        if self.multi and captions:
            raise ValueError("a multi-query model ranks images for queries, not captions: no caption gallery")
        self.captions = list(captions)
        owners = resolve_image_ids({c.image_id for c in self.captions}, self.gallery)
        self.caption_owner = [owners.get(c.image_id) for c in self.captions]  # gallery id or None
        self.caption_tokens = [vocab.encode(c.text) for c in self.captions]
        self._caption_blocks = self._encode_captions() if self._caption_bytes() <= caption_cache_bytes else None
        self.info = EngineInfo(checkpoint="", gallery_size=len(gallery), captions=len(self.captions),
                               device=str(device), ranker=self.ranker.name,
                               multi_query=ROUNDS if self.multi else MEAN_OF_QUERIES,
                               index_path=None, index_built=False, start_seconds=0.0,
                               shortlist=getattr(self.ranker, "shortlist", 0))

    @classmethod
    def open(cls, checkpoint_path: str | os.PathLike, features: str | os.PathLike, *,
             captions: str | os.PathLike | None = None, split: str | None = None,
             index_path: str | os.PathLike | None = None, device: str = "auto", ranker: str = "auto",
             shortlist: int = SEARCH_SHORTLIST, batch_size: int = 128) -> SearchEngine:
        """Load a checkpoint and a gallery as `tshsr-pipe search` does, once.

        `captions` (+ `split`) limit the gallery to the split's images, as in `search`, and are
        the caption gallery of `image_captions`. `index_path` loads (or builds) the encoded
        gallery from a search index; without it the gallery is encoded in memory. `ranker`: a
        name in `RANKERS`, or "auto": "shortlist" for a model with a trained first stage
        (`matching.retrieval.shortlist.has_first_stage`) and a gallery larger than `shortlist`, else "exact".
        QueryError, CheckpointError, ShardFormatError, SearchIndexError … for input that cannot serve.
        """
        from extract.runtime import resolve_device
        from matching.retrieval.index import open_index

        started = time.perf_counter()
        if split and captions is None:
            raise QueryError(f"--split {split} needs --captions: the file that says which images are in it")
        if ranker not in RANKER_CHOICES:
            raise QueryError(f"ranker {ranker!r}: not one of {', '.join(RANKER_CHOICES)}")
        target = resolve_device(device)
        model, config, vocab = checkpoint.load(checkpoint_path, map_location=target)
        store = FeatureStore(features)
        check_features(store, config.model.img_dim, config.model.num_regions, checkpoint_path)
        selected: list[Caption] = []
        gallery = store.image_ids
        if captions is not None:  # a caption file, or a multi-query file (its images; no captions)
            image_ids, selected = gallery_of(captions, split)
            gallery = sorted(set(resolve_image_ids(image_ids, store.image_ids).values()))
            if not gallery:
                raise QueryError(f"{captions}: none of its {split or ''} images is in {store.directory}")
        built = False
        if index_path is not None:
            index = open_index(index_path, model, checkpoint_path, store, gallery, device=target,
                               batch_size=batch_size)
            encoded, built = index.encoded, index.built
        else:
            with torch.inference_mode():
                encoded = encode_images(model, StoreImages(store, gallery), target, batch_size)
        if config.task == "multi-query":
            ranker = "exact"  # HMRN scores every image; its rounds are its own
        elif ranker == "shortlist":
            require_first_stage(config, checkpoint_path)
        elif ranker == "auto":
            ranker = "shortlist" if default_search_shortlist(config) and shortlist < len(gallery) else "exact"
        engine = cls(model, vocab, store, gallery, encoded=encoded, captions=selected, device=target,
                     ranker=RANKERS[ranker](model, encoded.to(target), target, batch_size,
                                            **({"shortlist": shortlist} if ranker == "shortlist" else {})),
                     batch_size=batch_size)
        engine.info.checkpoint = str(checkpoint_path)
        engine.info.index_path = str(index_path) if index_path is not None else None
        engine.info.index_built = built
        engine.info.start_seconds = time.perf_counter() - started
        return engine

    # ------------------------------------------------------------------ text → images

    def search_text(self, query: str, k: int) -> TextResult:
        """The `k` best gallery images for a text, best first, with their attended regions."""
        if self.multi:  # one round of the model's own rounds
            found = self.search_queries([query], k)
            return TextResult(found.hits, found.ignored_words[0])
        tokens, ignored = encode_query(self.vocab, query)
        found = self.ranker.candidates([tokens], k)
        order = np.argsort(-found.scores[:, 0], kind="stable")[:k]
        positions = found.index[order]
        caption = found.queries.caption(0) if found.queries is not None else None
        return TextResult(self._image_hits(positions, found.scores[order, 0], tokens, caption), ignored)

    def search_queries(self, queries: Sequence[str], k: int) -> RoundsResult:
        """The `k` best images for queries given in rounds, by the mean of their scores.

        Round r ranks the candidates by the mean score of queries 1..r; each hit of the last
        round carries its rank after every round (1-based, among the ranker's candidates), so
        a page can show how adding a query moved it. One query gives `search_text`'s ranking.
        """
        if not queries:
            raise QueryError("give at least one query")
        encoded = []
        for number, text in enumerate(queries, 1):
            try:
                encoded.append(encode_query(self.vocab, text))
            except QueryError as error:
                raise QueryError(f"query {number}: {error}") from None
        if self.multi:
            return self._rounds(queries, k, [ignored for _, ignored in encoded])
        found = self.ranker.candidates([tokens for tokens, _ in encoded], k)
        cumulative = np.cumsum(found.scores.astype(np.float64), axis=1)  # (c, q)
        rounds = cumulative / np.arange(1, len(queries) + 1)  # (c, q): column r = mean of queries 0..r
        ranks = np.empty(rounds.shape, np.int64)  # (c, q): rank of each candidate after each round
        for r in range(len(queries)):
            ranks[np.argsort(-rounds[:, r], kind="stable"), r] = np.arange(1, len(rounds) + 1)
        # one query: keep the float32 score itself, so search_queries([q]) is search_text(q) exactly
        final = found.scores[:, 0] if len(queries) == 1 else rounds[:, -1].astype(np.float32)
        order = np.argsort(-final, kind="stable")[:k]
        # the regions shown are those the latest query attends to: what the last round added
        last = found.queries.caption(len(queries) - 1) if found.queries is not None else None
        hits = self._image_hits(found.index[order], final[order], encoded[-1][0], last)
        for hit, row in zip(hits, order, strict=True):
            hit.rank_by_round = ranks[row].tolist()
        return RoundsResult(hits, [ignored for _, ignored in encoded], MEAN_OF_QUERIES)

    def _rounds(self, queries: Sequence[str], k: int, ignored: list[list[str]]) -> RoundsResult:
        """A multi-query model's answer: its score after the last round, its ranks after every round."""
        hits, _ = search_query_set(self.model, self.vocab, self.store, queries, k=k, image_ids=self.gallery,
                                   device=self.device, batch_size=self.batch_size, with_regions=True,
                                   encoded=self.encoded)
        found = [ImageHit(hit, self.store.get(hit.image_id)[3], rank_by_round=hit.round_ranks) for hit in hits]
        return RoundsResult(found, ignored, ROUNDS)

    def _image_hits(self, positions: np.ndarray, scores: np.ndarray, tokens: list[int],
                    caption: Embedded | None = None) -> list[ImageHit]:
        weights = self.region_weights(positions, tokens, caption) if len(positions) else []
        hits = []
        for rank, (position, score, row) in enumerate(zip(positions, scores, weights, strict=True), 1):
            image_id = self.gallery[int(position)]
            _, boxes, k, size = self.store.get(image_id)
            strongest = np.argsort(-row[:k])[:REGIONS_SHOWN]
            regions = [(boxes[i].tolist(), float(row[i])) for i in strongest]
            hits.append(ImageHit(Hit(rank, float(score), image_id, image_id, regions=regions), size))
        return hits

    def region_weights(self, positions: np.ndarray, tokens: list[int], caption: Embedded | None = None) -> np.ndarray:
        """How much a caption's words attend to each region of already-encoded gallery images:
        Eq. 2's α averaged over the words, (n, K) (padded regions 0), as
        `matching.retrieval.evaluate.attended_regions` computes it for one image from its features.
        `caption`: the caption as the model encoded it (1, L, d), when the ranker kept it."""
        from matching.model.similarity import clipped_cosines, region_attention

        index = torch.as_tensor(np.asarray(positions, np.int64), device=self.device)
        with torch.inference_mode():
            images = self.encoded.select(index)  # (n, K, d)
            if caption is None:
                caption = self.model.encode_captions(torch.tensor([tokens], device=self.device),
                                                     torch.tensor([len(tokens)]))  # (1, L, d)
            cos = clipped_cosines(images.local, caption.local, self.model.head.attention_clip)  # (n, 1, K, L)
            alpha = region_attention(cos, images.mask, caption.mask, self.model.head.lambda_i2t)  # (n, 1, L, K)
            return alpha[:, 0].mean(1).cpu().numpy()  # (n, K)

    # ------------------------------------------------------------------ image → captions

    def image_captions(self, image_id: str, k: int) -> CaptionsResult:
        """The `k` captions of the caption gallery that best describe a gallery image, best first."""
        position = self.require(image_id)
        if self.multi:
            raise QueryError("a multi-query model ranks images for queries, not captions for an image")
        if not self.captions:
            raise QueryError("no caption gallery: start with --captions to rank captions for an image")
        scores = np.zeros(len(self.captions), np.float32)
        image = self.encoded.select(slice(position, position + 1))
        with torch.inference_mode():
            for index, block in self._caption_blocks or self._encode_captions():
                scores[index.numpy()] = self.model.pair_scores(image, block)[0].float().cpu().numpy()
        order = np.argsort(-scores, kind="stable")[:k]
        hits = [Hit(rank, float(scores[i]), self.captions[i].text, image_id,
                    matches_query_image=self.caption_owner[i] == image_id) for rank, i in enumerate(order, 1)]
        own = [c.text for c, owner in zip(self.captions, self.caption_owner, strict=True) if owner == image_id]
        return CaptionsResult(image_id, hits, own)

    def _caption_bytes(self) -> int:
        """Memory of the encoded caption gallery: blocks padded to their longest caption, float32."""
        lengths = sorted(len(t) for t in self.caption_tokens)
        d = self.encoded.local.shape[-1]
        padded = sum(len(lengths[i:i + self.batch_size]) * lengths[i:i + self.batch_size][-1]
                     for i in range(0, len(lengths), self.batch_size))
        return 4 * d * (padded + len(lengths))

    def _encode_captions(self) -> list[tuple[torch.Tensor, Embedded]]:
        with torch.inference_mode():
            return encode_captions(self.model, self.caption_tokens, self.device, self.batch_size)

    # ------------------------------------------------------------------ the gallery

    def require(self, image_id: str) -> int:
        """The gallery position of an image id; UnknownImageError if it is not in the gallery."""
        try:
            return self.position[image_id]
        except (KeyError, TypeError):
            raise UnknownImageError(f"image {image_id!r} is not in the gallery") from None
