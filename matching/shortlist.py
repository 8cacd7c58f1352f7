"""Two-stage retrieval for large galleries: a global-embedding shortlist, then exact re-scoring.

Stage one ranks by the cosine of the global vectors v̄ and t̄ (`Embedded.glob`)
with faiss: an exact inner-product index on l2-normalised float32 vectors by
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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from matching.encoders import Embedded
from matching.model import TSHSR
from matching.scoring import (
    CPU_BLOCK_PAIRS,
    ImageSource,
    encode_captions,
    encode_images,
    length_groups,
    matmul_precision,
)

INDEX_KINDS = ("flat", "ivf", "hnsw")


def global_vectors(embedded: Embedded | torch.Tensor) -> np.ndarray:
    """The l2-normalised global vectors as contiguous float32 (n, d): inner product = cosine."""
    vectors = embedded.glob if isinstance(embedded, Embedded) else embedded
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
    """Stage one: each caption's `k_images` and each image's `k_captions` nearest by global cosine."""
    images = GlobalIndex.build(image_vectors, kind, **index_options)
    captions = GlobalIndex.build(caption_vectors, kind, **index_options)
    return Shortlist(images.search(caption_vectors, k_images)[1], captions.search(image_vectors, k_captions)[1])


def score_candidates(
    model: TSHSR,
    images: ImageSource | Embedded,
    captions: Sequence[Sequence[int]] | Embedded,
    candidates: np.ndarray,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 128,
    block_pairs: int | None = None,
    precision: str = "float32",
) -> np.ndarray:
    """Stage two: the full model's score of each candidate (image, caption) pair: (n,) float32.

    Args:
        model: the network; put in eval mode for the call and restored after.
        images: region features (any `ImageSource`) or images encoded by this model.
        captions: token-id lists, or captions encoded by this model (an `Embedded`).
        candidates: (n, 2) integer array of (image index, caption index) pairs.
        block_pairs: pairs scored in one pass (default 128 on a CPU, where a pass gathers its
            pairs' regions, 19 MB at K = 36 and d = 1024; 16384 on a GPU).
        precision: "float32", "tf32" or "bf16", as for `score_matrix`.
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
            if isinstance(captions, Embedded):
                groups = length_groups([(torch.arange(len(captions)), captions.to(device))])
            else:
                groups = length_groups(encode_captions(model, captions, device, batch_size))
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
    finally:
        model.train(was_training)
    return scores
