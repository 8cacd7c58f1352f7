"""Similarity representation (§III-B, §III-C): cross attention, vector similarities, the two streams.

Everything here works on a block of Bi images × Bc captions at once: the
score of every pair is computed in one batched pass, with padding masks in
place of the reference code's loop over captions.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from matching.encoders import Embedded
from matching.tensors import l2norm, masked_mean, masked_softmax, xavier_init_


def clipped_cosines(regions: Tensor, words: Tensor, clip: str = "leaky_relu") -> Tensor:
    """[c_ij]₊ for every pair: regions (Bi, K, d), words (Bc, L, d) → (Bi, Bc, K, L).

    The embeddings are l2-normalised, so the dot product is the cosine. The
    reference code clips with LeakyReLU(0.1) where the paper writes max(0, ·).
    """
    cosines = torch.einsum("ikd,cld->ickl", regions, words)  # (Bi, Bc, K, L)
    if clip == "relu":
        return torch.relu(cosines)
    return nn.functional.leaky_relu(cosines, 0.1)


def region_attention(cosines: Tensor, region_mask: Tensor, word_mask: Tensor, lam: float) -> Tensor:
    """Eq. 2's weights α_ij: cosines (Bi, Bc, K, L) clipped → (Bi, Bc, L, K), a softmax over regions.

    c̄ is normalised over the words of the caption before the softmax.
    """
    cosines = cosines * word_mask[None, :, None, :]  # padded words out of the norm
    normed = l2norm(cosines, dim=3)  # (Bi, Bc, K, L)
    return masked_softmax(lam * normed.transpose(2, 3), region_mask[:, None, None, :])


def attend_regions(cosines: Tensor, regions: Tensor, region_mask: Tensor, word_mask: Tensor,
                   lam: float) -> Tensor:
    """Eq. 2: for each word j the attended image vector α_j^v = Σ_i α_ij v_i, l2-normalised.

    cosines (Bi, Bc, K, L) clipped; regions (Bi, K, d); masks (Bi, K), (Bc, L) → (Bi, Bc, L, d).
    """
    alpha = region_attention(cosines, region_mask, word_mask, lam)  # (Bi, Bc, L, K)
    return l2norm(torch.einsum("iclk,ikd->icld", alpha, regions))


def attend_words(cosines: Tensor, words: Tensor, region_mask: Tensor, word_mask: Tensor,
                 lam: float) -> Tensor:
    """Eq. 3: for each region i the attended text vector β_i^t = Σ_j β_ij t_j, l2-normalised.

    cosines (Bi, Bc, K, L) clipped; words (Bc, L, d); masks (Bi, K), (Bc, L) → (Bi, Bc, K, d).
    c̄ is normalised over the regions of the image; β is a softmax over the words.
    """
    cosines = cosines * region_mask[:, None, :, None]  # padded regions out of the norm
    normed = l2norm(cosines, dim=2)  # (Bi, Bc, K, L)
    beta = masked_softmax(lam * normed, word_mask[None, :, None, :])  # (Bi, Bc, K, L)
    return l2norm(torch.einsum("ickl,cld->ickd", beta, words))


class VectorSimilarity(nn.Module):
    """Eq. 1 as SGRAF defines it: S(x, y) = l2norm(W (x − y)² + b), W: d → m."""

    def __init__(self, embed_size: int, sim_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(embed_size, sim_dim)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """x, y (..., d) broadcastable → (..., m)."""
        return l2norm(self.proj((x - y).pow(2)))


class SimilarityHead(nn.Module):
    """Pair scores from encoded images and captions: the two streams, reasoning and fusion.

    i2t stream: nodes [s^g, S(α_1^v, t_1), …, S(α_L^v, t_L)]  (L+1 nodes)
    t2i stream: nodes [s^g, S(v_1, β_1^t), …, S(v_K, β_K^t)]  (K+1 nodes)
    The stream named by `reasoning_stream` passes through the M reasoning
    layers and reads out node 0; the other (or both, when M = 0) is averaged
    over its valid nodes (Eq. 7). The read-outs are summed (Eq. 8) and scored
    by sigmoid(w·S* + b).
    """

    def __init__(self, *, embed_size: int, sim_dim: int, streams: str, reasoning: nn.ModuleList,
                 reasoning_stream: str, lambda_i2t: float, lambda_t2i: float,
                 attention_clip: str) -> None:
        super().__init__()
        self.streams = streams
        self.reasoning_stream = reasoning_stream
        self.lambda_i2t = lambda_i2t
        self.lambda_t2i = lambda_t2i
        self.attention_clip = attention_clip
        self.sim_local = VectorSimilarity(embed_size, sim_dim)  # shared by both streams
        self.sim_global = VectorSimilarity(embed_size, sim_dim)
        self.reasoning = reasoning
        self.score = nn.Linear(sim_dim, 1)
        xavier_init_(self.sim_local)
        xavier_init_(self.sim_global)
        xavier_init_(self.score)

    def _read_out(self, stream: str, nodes: Tensor, mask: Tensor) -> Tensor:
        """nodes (Bi, Bc, n, m), mask (Bi, Bc, n) → (Bi, Bc, m)."""
        if len(self.reasoning) and stream == self.reasoning_stream:
            bi, bc, n, m = nodes.shape
            flat, flat_mask = nodes.reshape(bi * bc, n, m), mask.reshape(bi * bc, n)
            for layer in self.reasoning:
                flat = layer(flat, flat_mask)
            return flat[:, 0].reshape(bi, bc, m)
        return masked_mean(nodes.flatten(0, 1), mask.flatten(0, 1)).reshape(*nodes.shape[:2], -1)

    def similarity_vector(self, images: Embedded, captions: Embedded) -> Tensor:
        """S* for every pair: (Bi, Bc, m)."""
        bi, bc = len(images), len(captions)
        global_node = self.sim_global(images.glob[:, None], captions.glob[None])  # (Bi, Bc, m)
        cosines = clipped_cosines(images.local, captions.local, self.attention_clip)  # (Bi, Bc, K, L)
        fused = torch.zeros_like(global_node)
        if self.streams in ("i2t", "both"):
            attended = attend_regions(cosines, images.local, images.mask, captions.mask, self.lambda_i2t)
            local = self.sim_local(attended, captions.local[None])  # (Bi, Bc, L, m)
            nodes = torch.cat([global_node.unsqueeze(2), local], dim=2)  # (Bi, Bc, L+1, m)
            mask = torch.cat([captions.mask.new_ones(bc, 1), captions.mask], dim=1)  # (Bc, L+1)
            fused = fused + self._read_out("i2t", nodes, mask[None].expand(bi, -1, -1))
        if self.streams in ("t2i", "both"):
            attended = attend_words(cosines, captions.local, images.mask, captions.mask, self.lambda_t2i)
            local = self.sim_local(images.local[:, None], attended)  # (Bi, Bc, K, m)
            nodes = torch.cat([global_node.unsqueeze(2), local], dim=2)  # (Bi, Bc, K+1, m)
            mask = torch.cat([images.mask.new_ones(bi, 1), images.mask], dim=1)  # (Bi, K+1)
            fused = fused + self._read_out("t2i", nodes, mask[:, None].expand(-1, bc, -1))
        return fused

    def forward(self, images: Embedded, captions: Embedded) -> Tensor:
        """Scores in (0, 1) for every pair: (Bi, Bc)."""
        return torch.sigmoid(self.score(self.similarity_vector(images, captions))).squeeze(-1)
