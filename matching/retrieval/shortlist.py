"""Two-stage retrieval for large galleries: a global-embedding shortlist, then exact re-scoring.

Stage one ranks by the cosine of one vector per image and per caption, the first
stage's (`first_stage_vectors`: the model's first-stage head, `matching.model.first_stage`,
or for an older model trained with the global loss its v̄ and t̄), with faiss: an
exact inner-product index on l2-normalised float32 vectors by
default (`IndexFlatIP`), an inverted-file (`ivf`) or HNSW graph (`hnsw`) index
as options for very large galleries. It costs d multiply-adds a pair where the
full model costs tens of millions.

Stage two re-scores only the shortlisted (image, caption) pairs with the full
model (`score_candidates`): pairs are sorted by caption length and scored in
dense blocks of aligned rows (`SimilarityHead.paired_scores`), so no caption is
padded and no pair outside the shortlist is computed.

faiss (`faiss-cpu`) is imported where an index is built.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from matching.config import INDEX_KINDS, SEARCH_SHORTLIST
from matching.model.encoders import Embedded
from matching.model.tshsr import TSHSR
from matching.retrieval.scoring import (
    CPU_BLOCK_PAIRS,
    ImageSource,
    encode_captions,
    encode_images,
    length_groups,
    matmul_precision,
)


class NoFirstStageError(ValueError):
    """A model whose shortlist vectors were never trained: two-stage retrieval would miss at random."""


def has_first_stage(config: Any) -> bool:
    """True for a matching model whose shortlist vectors were trained: it has a first-stage head
    (`model.first_stage_dim` > 0), or (models trained before the head) the global loss trained v̄, t̄."""
    return getattr(config.model, "first_stage_dim", 0) > 0 or getattr(config.train, "global_loss_weight", 0) > 0


def require_first_stage(config: Any, source: object) -> None:
    """NoFirstStageError naming `source` when its model has no trained first stage."""
    if not has_first_stage(config):
        raise NoFirstStageError(
            f"{source}: this model has no trained first stage (no first-stage head, trained without the global "
            "loss, or imported from SGRAF), so a global-vector shortlist would drop the right answers at random; "
            "score every pair (leave out --shortlist, or --shortlist 0), or train with the default "
            "model.first_stage_dim")


def first_stage_vectors(model: TSHSR, encoded: Embedded, side: str, batch_size: int = 1024) -> torch.Tensor:
    """The shortlist's vectors of encoded images (`side` "images") or captions ("captions"), in blocks:
    (n, e), as `TSHSR.image_vectors` / `caption_vectors` give them. Call under inference mode."""
    vectors = model.image_vectors if side == "images" else model.caption_vectors
    return torch.cat([vectors(encoded.select(slice(start, start + batch_size)))
                      for start in range(0, len(encoded), batch_size)])


def global_vectors(vectors: torch.Tensor) -> np.ndarray:
    """Vectors as contiguous float32 (n, e), l2-normalised: inner product = cosine."""
    array = np.ascontiguousarray(vectors.detach().float().cpu().numpy(), dtype=np.float32)
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    return array / np.maximum(norms, 1e-12)


@dataclass
class GlobalIndex:
    """A faiss index over the global vectors of a gallery (images or captions)."""

    index: Any  # faiss.Index
    kind: str
    size: int
    dim: int

    @classmethod
    def build(cls, vectors: np.ndarray, kind: str = "flat", *, nlist: int | None = None, nprobe: int = 16,
              hnsw_neighbors: int = 32, ef_search: int = 128, ef_construction: int = 200) -> GlobalIndex:
        """Index float32 vectors (n, d) for inner-product search.

        Args:
            vectors: the gallery, l2-normalised (see `global_vectors`).
            kind: "flat" (exact), "ivf" (an inverted file of `nlist` k-means cells, `nprobe` of
                them searched; default nlist ≈ 4·√n) or "hnsw" (a graph with `hnsw_neighbors`
                links a node, `ef_search` candidates a query).
        """
        import faiss

        if kind not in INDEX_KINDS:
            raise ValueError(f"unknown index kind {kind!r}; choose one of {', '.join(INDEX_KINDS)}")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) == 0:
            raise ValueError(f"an index needs a non-empty (n, d) array, not shape {vectors.shape}")
        n, dim = vectors.shape
        if kind == "flat":
            index = faiss.IndexFlatIP(dim)
        elif kind == "ivf":
            cells = max(1, min(nlist or int(4 * np.sqrt(n)), n))
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, cells, faiss.METRIC_INNER_PRODUCT)
            index.train(vectors)
            index.nprobe = min(nprobe, cells)
        else:
            index = faiss.IndexHNSWFlat(dim, hnsw_neighbors, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = ef_construction
            index.hnsw.efSearch = ef_search
        index.add(vectors)
        return cls(index, kind, n, dim)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k best gallery items of each query: (cosines (q, k) float32, ids (q, k) int64), best first.

        k is capped at the gallery size; approximate indexes may return fewer, padded with id -1.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be (q, {self.dim}), not shape {queries.shape}")
        k = min(k, self.size)
        if hasattr(self.index, "hnsw"):
            self.index.hnsw.efSearch = max(self.index.hnsw.efSearch, k)  # HNSW returns at most efSearch
        scores, ids = self.index.search(queries, k)
        return scores, ids


@dataclass
class Shortlist:
    """Stage one both ways: each caption's best images, each image's best captions (ids, best first)."""

    images_of_caption: np.ndarray  # (n_captions, k_images) int64, -1 where an index returned fewer
    captions_of_image: np.ndarray  # (n_images, k_captions) int64

    def candidates(self) -> np.ndarray:
        """The union of the shortlisted (image, caption) pairs, each once: (n, 2) int64, sorted."""
        n_captions, k_images = self.images_of_caption.shape
        n_images, k_captions = self.captions_of_image.shape
        t2i = np.stack([self.images_of_caption.ravel(), np.repeat(np.arange(n_captions), k_images)], 1)
        i2t = np.stack([np.repeat(np.arange(n_images), k_captions), self.captions_of_image.ravel()], 1)
        pairs = np.concatenate([t2i, i2t])
        pairs = pairs[(pairs >= 0).all(1)]
        return np.unique(pairs, axis=0)


def shortlist(image_vectors: np.ndarray, caption_vectors: np.ndarray, k_images: int, k_captions: int,
              kind: str = "flat", **index_options: Any) -> Shortlist:
    """Stage one: each caption's `k_images` and each image's `k_captions` nearest by first-stage cosine."""
    images = GlobalIndex.build(image_vectors, kind, **index_options)
    captions = GlobalIndex.build(caption_vectors, kind, **index_options)
    return Shortlist(images.search(caption_vectors, k_images)[1], captions.search(image_vectors, k_captions)[1])


@dataclass
class CaptionGroups:
    """Captions encoded once: grouped by exact length for the head, first-stage vectors in caption order."""

    groups: list[tuple[torch.Tensor, Embedded]]  # [(caption indices, Embedded (n_L, L, d))]
    vectors: torch.Tensor  # (n, e) the shortlist's vector of each caption (`first_stage_vectors`)

    def __len__(self) -> int:
        return len(self.vectors)

    def caption(self, number: int) -> Embedded:
        """Caption `number` as the encoder gave it: (1, L, d), L its own length."""
        for index, emb in self.groups:
            rows = (index == number).nonzero().flatten()
            if len(rows):
                return emb.select(rows.to(emb.local.device))
        raise IndexError(f"no caption {number} among {len(self)}")

    @classmethod
    def encode(cls, model: TSHSR, captions: Sequence[Sequence[int]] | Embedded, device: torch.device,
               batch_size: int = 128) -> CaptionGroups:
        """Encode token lists (or group captions already encoded); call under inference mode, model in eval."""
        if isinstance(captions, Embedded):
            blocks = [(torch.arange(len(captions)), captions.to(device))]
        else:
            blocks = encode_captions(model, captions, device, batch_size)
        parts = [(index, first_stage_vectors(model, emb, "captions")) for index, emb in blocks]
        vectors = torch.empty((sum(len(index) for index, _ in parts), parts[0][1].shape[1]),
                              dtype=parts[0][1].dtype, device=device)
        for index, part in parts:
            vectors[index.to(device)] = part
        return cls(length_groups(blocks), vectors)


def score_candidates(
    model: TSHSR,
    images: ImageSource | Embedded,
    captions: Sequence[Sequence[int]] | Embedded | CaptionGroups,
    candidates: np.ndarray,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 128,
    block_pairs: int | None = None,
    precision: str = "float32",
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Stage two: the full model's score of each candidate (image, caption) pair: (n,) float32.

    Args:
        model: the network; put in eval mode for the call and restored after.
        images: region features (any `ImageSource`) or images encoded by this model.
        captions: token-id lists, or captions encoded by this model (an `Embedded` or `CaptionGroups`).
        candidates: (n, 2) integer array of (image index, caption index) pairs.
        block_pairs: pairs scored in one pass (default 128 on a CPU, where a pass gathers its
            pairs' regions, 19 MB at K = 36 and d = 1024; 16384 on a GPU).
        precision: "float32", "tf32" or "bf16", as for `score_matrix`.
        progress: called with the number of pairs after each block.
    """
    candidates = np.asarray(candidates, dtype=np.int64).reshape(-1, 2)
    scores = np.zeros(len(candidates), np.float32)
    if len(candidates) == 0:
        return scores
    if (candidates < 0).any() or candidates[:, 0].max() >= len(images) or candidates[:, 1].max() >= len(captions):
        raise ValueError(f"candidate pairs must index {len(images)} images and {len(captions)} captions")
    device = torch.device(device)
    block = block_pairs or (CPU_BLOCK_PAIRS // 2 if device.type != "cuda" else 1 << 14)
    was_training = model.training
    model.eval().to(device)
    try:
        with torch.inference_mode():
            image_emb = images.to(device) if isinstance(images, Embedded) else encode_images(
                model, images, device, batch_size)
            groups = (captions if isinstance(captions, CaptionGroups)
                      else CaptionGroups.encode(model, captions, device, batch_size)).groups
            # Each caption's place: (its length group, its row there).
            group_of, row_of = np.zeros(len(captions), np.int64), np.zeros(len(captions), np.int64)
            for number, (index, _) in enumerate(groups):
                group_of[index.numpy()] = number
                row_of[index.numpy()] = np.arange(len(index))
            pair_group = group_of[candidates[:, 1]]
            for number, (_, caption_emb) in enumerate(groups):
                members = np.flatnonzero(pair_group == number)
                # Within a group, pairs in image order: consecutive rows gather nearby images.
                members = members[np.argsort(candidates[members, 0], kind="stable")]
                for start in range(0, len(members), block):
                    chosen = members[start:start + block]
                    image_rows = torch.from_numpy(candidates[chosen, 0]).to(device)
                    caption_rows = torch.from_numpy(row_of[candidates[chosen, 1]]).to(device)
                    with matmul_precision(precision, device):
                        block_scores = model.head.paired_scores(image_emb.select(image_rows),
                                                                caption_emb.select(caption_rows))
                    scores[chosen] = block_scores.float().cpu().numpy()
                    if progress is not None:
                        progress(len(chosen))
    finally:
        model.train(was_training)
    return scores




def default_search_shortlist(config: Any) -> int:
    """Images a search re-ranks by default: `SEARCH_SHORTLIST` for a model with a trained first stage
    (`has_first_stage`), 0 (score every image) otherwise."""
    return SEARCH_SHORTLIST if has_first_stage(config) else 0


def encode_queries(model: TSHSR, queries: Sequence[Sequence[int]], device: str | torch.device = "cpu",
                   batch_size: int = 128) -> CaptionGroups:
    """Token-id queries encoded once by the model (in eval mode for the call): their first-stage vectors for the
    shortlist and their words for re-scoring (`score_matrix` takes them as they are)."""
    was_training = model.training
    model.eval().to(device)
    try:
        with torch.inference_mode():
            return CaptionGroups.encode(model, queries, torch.device(device), batch_size)
    finally:
        model.train(was_training)


@dataclass
class ShortlistReport:
    """How the first stage did on one protocol's galleries (folds averaged, pairs summed)."""

    k_images: int  # images each caption re-ranks
    k_captions: int  # captions each image re-ranks
    t2i_recall: float  # % of captions whose image is in their shortlist
    i2t_recall: float  # % of images with one of their captions in theirs
    pairs_scored: int  # distinct (image, caption) pairs the full model scored
    pairs_total: int  # the pairs exact scoring of the same galleries scores

    def line(self) -> str:
        return (f"shortlist recall (ground truth among the {self.k_images} images / {self.k_captions} captions "
                f"re-ranked): text → image {self.t2i_recall:.1f}%, image → text {self.i2t_recall:.1f}%; "
                f"{self.pairs_scored:,} of {self.pairs_total:,} pairs scored "
                f"({100 * self.pairs_scored / max(self.pairs_total, 1):.2f}%)")


def joint_vectors(parts: Sequence[np.ndarray]) -> np.ndarray:
    """Unit global vectors of several models side by side, scaled by 1/√M: one inner product is
    the mean of the models' cosines, so an ensemble shortlists with one faiss index."""
    return np.ascontiguousarray(np.concatenate(parts, axis=1) / np.sqrt(len(parts)), dtype=np.float32)


def two_stage_metrics(
    models: Sequence[TSHSR],
    images: ImageSource,
    tokens: Sequence[Sequence[Sequence[int]]],
    *,
    k: int,
    protocol: str = "all",
    captions_per_image: int = 5,
    kind: str = "flat",
    device: str | torch.device = "cpu",
    batch_size: int = 128,
    precision: str = "float32",
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> tuple[dict[str, dict[str, Any]], dict[str, ShortlistReport]]:
    """Retrieval metrics by two-stage retrieval, in every gallery of a protocol (each 1K fold is its own).

    Each caption re-ranks its `k` best images by first-stage cosine with the full model, each image
    its `captions_per_image · k` best captions; everything outside a shortlist ranks after it, by
    cosine. An ensemble shortlists by the mean of its models' cosines and re-ranks by the mean of
    their scores. Candidate pairs of all galleries are scored once.

    Args:
        models: one model, or several to ensemble (each in eval mode for the call).
        tokens: the captions' token ids for each model (its own vocabulary).
    Returns: ({protocol name: metrics as `evaluate_protocol` gives them}, {protocol name: ShortlistReport}).
    """
    from matching.retrieval.metrics import mean_of_folds, protocol_galleries, recall_metrics
    from matching.retrieval.scoring import ScoringProgress

    if k < 1:
        raise ValueError(f"the shortlist needs k ≥ 1, not {k}")
    device = torch.device(device)
    cpi = captions_per_image
    galleries = protocol_galleries(len(images), protocol, cpi)
    encoded: list[tuple[Embedded, CaptionGroups]] = []
    states = [model.training for model in models]
    try:
        vectors = []
        for model in models:
            model.eval().to(device)
            with torch.inference_mode():
                image_emb = encode_images(model, images, device, batch_size)
                encoded.append((image_emb, CaptionGroups.encode(model, tokens[len(encoded)], device, batch_size)))
                vectors.append(global_vectors(first_stage_vectors(model, image_emb, "images")))
        image_vectors = joint_vectors(vectors)
        caption_vectors = joint_vectors([global_vectors(groups.vectors) for _, groups in encoded])
        n_captions = len(caption_vectors)
        # Stage one in every gallery; its shortlists in global image and caption numbers.
        lists: dict[str, list[tuple[slice, slice, Shortlist]]] = {}
        for name, parts in galleries.items():
            lists[name] = []
            for rows, cols in parts:
                found = shortlist(image_vectors[rows], caption_vectors[cols], k, cpi * k, kind)
                found.images_of_caption = np.where(found.images_of_caption >= 0,
                                                   found.images_of_caption + rows.start, -1)
                found.captions_of_image = np.where(found.captions_of_image >= 0,
                                                   found.captions_of_image + cols.start, -1)
                lists[name].append((rows, cols, found))
        # Stage two: every distinct candidate pair once, with each model.
        pairs = np.unique(np.concatenate([_global_candidates(found, rows, cols)
                                          for parts in lists.values() for rows, cols, found in parts]), axis=0)
        tracker = ScoringProgress(len(pairs) * len(models), bar=progress, log=log)
        exact = np.mean([score_candidates(model, image_emb, groups, pairs, device=device, precision=precision,
                                          progress=tracker.update)
                         for model, (image_emb, groups) in zip(models, encoded, strict=True)], axis=0)
        tracker.close()
    finally:
        for model, state in zip(models, states, strict=False):
            model.train(state)
    pair_ids = pairs[:, 0] * n_captions + pairs[:, 1]  # sorted: np.unique sorts the pairs
    floor = float(exact.min()) - 2.0  # every shortlisted score ranks above every cosine + floor
    results: dict[str, dict[str, Any]] = {}
    reports: dict[str, ShortlistReport] = {}
    for name, parts in lists.items():
        folds, recalls, scored, total = [], [], 0, 0
        for rows, cols, found in parts:
            base = image_vectors[rows] @ caption_vectors[cols].T + np.float32(floor)
            by_caption, by_image = base.copy(), base
            t2i = _local_pairs(found.images_of_caption, cols.start, transpose=True)  # (image, caption) global
            i2t = _local_pairs(found.captions_of_image, rows.start, transpose=False)
            for keys, chosen in ((by_caption, t2i), (by_image, i2t)):
                values = exact[np.searchsorted(pair_ids, chosen[:, 0] * n_captions + chosen[:, 1])]
                keys[chosen[:, 0] - rows.start, chosen[:, 1] - cols.start] = values
            folds.append(recall_metrics(by_image, cpi, t2i_sims=by_caption))
            owner = np.arange(cols.start, cols.stop) // cpi  # each caption's image
            image = np.arange(rows.start, rows.stop)
            recalls.append((100.0 * float((found.images_of_caption == owner[:, None]).any(1).mean()),
                            100.0 * float((found.captions_of_image // cpi == image[:, None]).any(1).mean())))
            scored += len(np.unique(np.concatenate([t2i, i2t]), axis=0))
            total += (rows.stop - rows.start) * (cols.stop - cols.start)
        results[name] = mean_of_folds(folds) if name == "coco1k" else folds[0]
        reports[name] = ShortlistReport(min(k, rows.stop - rows.start), min(cpi * k, cols.stop - cols.start),
                                        float(np.mean([r[0] for r in recalls])),
                                        float(np.mean([r[1] for r in recalls])), scored, total)
    return results, reports


def _local_pairs(ids: np.ndarray, start: int, *, transpose: bool) -> np.ndarray:
    """A shortlist's (query row, gallery id) entries as (image, caption) pairs, -1 entries dropped.

    `ids` is (n_queries, k) of gallery ids; query q is number `start + q`. `transpose`: the queries
    are captions (so the pair is (gallery id, query)).
    """
    queries = np.repeat(np.arange(start, start + len(ids)), ids.shape[1])
    flat = ids.ravel()
    keep = flat >= 0
    pair = np.stack([flat[keep], queries[keep]] if transpose else [queries[keep], flat[keep]], 1)
    return pair.astype(np.int64)


def _global_candidates(found: Shortlist, rows: slice, cols: slice) -> np.ndarray:
    return np.concatenate([_local_pairs(found.images_of_caption, cols.start, transpose=True),
                           _local_pairs(found.captions_of_image, rows.start, transpose=False)])
